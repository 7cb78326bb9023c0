"""A 2-stage pipeline's training step over an emulated edge link (benchmarks.netem): receives
posted one action ahead (what galaxy.pipeline does) vs posted when needed, 1F1B and GPipe.

    sudo python -m benchmarks.edge_pipeline                   # 100 Mbit/s, BERT-base width, 4 layers
    sudo python -m benchmarks.edge_pipeline --rate 1gbit --seq 512

Under 1F1B activations and gradients cross the one link in both directions at once, and gloo
stalls a message that arrives before its receive is posted. "late" is the same engine with its
receive-ahead switched off (each receive posted when its action needs it).
"""
import argparse
import statistics
import sys
import time

from benchmarks.netem import EdgeNet, add_worker_args

PORT = 29551


def worker(args):
    import torch
    import torch.distributed as dist

    from galaxy.comm.context import ParallelContext
    from galaxy.config.load import load_config
    from galaxy.data import SyntheticMLM
    from galaxy.models.bert import BertConfig, BertForMaskedLM
    from galaxy.pipeline import PipelineForwardBackward
    from galaxy.plan import build_plan
    from galaxy.runtime.launch import init_distributed
    from galaxy.train.loop import Trainer

    torch.set_num_threads(1)  # both ranks share this machine's cores (the library no longer sets it)
    init_distributed(2, args.rank, f"tcp://{args.master_addr}:{PORT}", "gloo", timeout_s=1800)
    post_ahead = PipelineForwardBackward._post_next_recv
    for schedule in ("1f1b", "gpipe"):
        cfg = load_config(None, dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=args.layers,
            vocab_size=8000, seq_length=args.seq, max_position_embeddings=max(512, args.seq), batch_size=8,
            num_microbatches=4, stage_num_hidden_layers_list=[args.layers // 2, args.layers - args.layers // 2],
            pipeline_schedule=schedule, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            data="synthetic", learning_rate=0.0))
        ctx = ParallelContext.create(build_plan(cfg, 2), args.rank)
        model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
        trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], 3), 100,
                          log=lambda *_: None)
        trainer.forward_backward = PipelineForwardBackward(trainer)
        trainer.train_step()  # warm-up
        times = {"late": [], "ahead": []}
        for _ in range(args.repeats):  # interleaved rounds
            for mode in times:
                PipelineForwardBackward._post_next_recv = post_ahead if mode == "ahead" else lambda self: None
                dist.barrier()
                start = time.perf_counter()
                trainer.train_step()
                dist.barrier()
                times[mode].append(time.perf_counter() - start)
        PipelineForwardBackward._post_next_recv = post_ahead
        if args.rank == 0:
            late, ahead = (statistics.median(times[m]) for m in ("late", "ahead"))
            print(f"{schedule:6s} receives posted late {late * 1e3:7.0f} ms, ahead {ahead * 1e3:7.0f} ms "
                  f"({late / ahead:.2f}x)", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4)
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with EdgeNet(args.rate) as net:
        print(f"{net.shaping}; BERT-base width, {args.layers} layers in 2 stages, seq {args.seq}, batch 8 in "
              f"4 micro-batches, training step, medians of {args.repeats} interleaved rounds")
        net.run_ranks([sys.executable, "-m", "benchmarks.edge_pipeline", "--worker", "--master_addr", net.addr[0],
                       "--layers", str(args.layers), "--seq", str(args.seq), "--repeats", str(args.repeats)], 1800)


if __name__ == "__main__":
    main()
