"""Training step time of plain data parallelism against ZeRO-1/2/3 and torch's FSDP2 `fully_shard`,
side by side in one run on loopback gloo (world 2 by default), and each engine's model state per rank.

Every engine trains its own copy of the same BERT-MLM (the same weights and batches); the engines
take turns step by step, so load from other processes hits all alike. Timed: one whole optimizer
step (forward, backward, gradient sync, clipping, AdamW), slowest rank, median over iterations.

    python -m benchmarks.zero [--world 2] [--iters 8] [--hidden 256] [--layers 4] [--seq 128] [--batch 8]
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.plan import build_plan
from galaxy.runtime.launch import spawn
from galaxy.train.loop import Trainer, label_tokens
from galaxy.train.zero import model_state_bytes

STAGES = (0, 1, 2, 3)


def make_cfg(args, **extra):
    return load_config(None, dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_attention_heads=4,
                                  num_hidden_layers=args.layers, vocab_size=8000, seq_length=args.seq,
                                  batch_size=args.batch, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  data="synthetic", warmup_steps=1, **extra))


def galaxy_step(rank, world, cfg):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    torch.manual_seed(cfg["seed"])
    trainer = Trainer(BertForMaskedLM(BertConfig.from_dict(cfg), ctx), ctx, cfg,
                      SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]), 1000, log=lambda *_: None)
    return trainer, trainer.train_step, sum(model_state_bytes(trainer).values())


def fsdp_step(rank, world, cfg, batches):
    """torch's FSDP2 on the serial model: every layer, then the root, fully_shard-ed over the world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(cfg["seed"])
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ParallelContext.create(build_plan(cfg, 1), 0))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    state = sum(p.to_local().numel() * p.element_size() * 4 for p in model.parameters())  # param, grad, 2 moments

    def step():
        batch = batches()
        n_tokens = torch.tensor(float(label_tokens(model, batch["labels"])))
        dist.all_reduce(n_tokens)
        loss_sum, _ = model(**batch)
        (loss_sum / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, state


def bench(rank, world, args):
    trainers, steps, state, fsdp_error = {}, {}, {}, None
    for stage in STAGES:
        name = f"zero-{stage}" if stage else "plain DP"
        cfg = make_cfg(args, data_parallel_size=world, zero_stage=stage)
        trainers[name], steps[name], state[name] = galaxy_step(rank, world, cfg)
    plain = trainers["plain DP"]
    try:
        name = "FSDP2 fully_shard"
        steps[name], state[name] = fsdp_step(rank, world, make_cfg(args), lambda: plain.micro_batches(plain.step)[0])
    except Exception as e:  # noqa: BLE001 - report why torch's engine did not run here, time the others
        fsdp_error = f"{type(e).__name__}: {e}"
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                times[name].append(elapsed.item())
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians, state, fsdp_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    medians, state, fsdp_error = spawn(bench, args.world, (args,), backend="gloo", timeout_s=600)[0]
    base = medians["plain DP"]
    print(f"world {args.world}, BERT hidden {args.hidden} x {args.layers} layers, seq {args.seq}, batch {args.batch}; "
          f"median of {args.iters} steps, slowest rank")
    print(f"{'engine':<20}{'step ms':>10}{'vs DP':>8}{'model state MiB (rank 0)':>27}")
    for name, t in medians.items():
        print(f"{name:<20}{t * 1e3:>10.1f}{t / base:>8.2f}{state[name] / 2**20:>27.2f}")
    if fsdp_error:
        print(f"FSDP2 fully_shard did not run here: {fsdp_error}")


if __name__ == "__main__":
    main()
