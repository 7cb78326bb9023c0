"""Galaxy's interleaved 1F1B and ZB-H1 against torch.distributed.pipelining's ScheduleInterleaved1F1B
and ScheduleInterleavedZeroBubble, with the bubble fraction measured and predicted.

World 2 on gloo. The same BERT layers (Galaxy's BertForMaskedLM) are cut two ways: one chunk per
rank (Galaxy 1F1B and ZB-H1, and torch's zero-bubble schedule given one stage per rank) and two
chunks per rank, rank r holding model stages r and 2 + r (Galaxy interleaved-1f1b, and torch's
interleaved schedules given the same two stages per rank). Timed: one forward+backward of the
batch (no optimizer step), slowest rank, median over iterations, runs alternating (order rotated).

Bubble, measured: the time ranks spend blocked on point-to-point transfers (Galaxy's StageLinks
receives and end-of-step send waits; torch's _wait_batch_p2p) over ranks x step time.
Bubble, predicted: galaxy.pipeline.simulate on the schedule's action lists (unit-time F, B, W; a
whole backward is B + W; no link time); for torch its own pipeline_order, converted.
The tied embedding/decoder sum is in both timed steps (as in benchmarks/pipeline_vs_torch.py).

    python -m benchmarks.schedules [--iters 5] [--microbatches 4] [--seq 64] [--hidden 128]
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble
from torch.distributed.pipelining import schedules as torch_schedules

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.pipeline import Action, PipelineForwardBackward, StageLinks, schedule_actions, simulate
from galaxy.plan import build_plan
from galaxy.runtime.launch import spawn
from galaxy.train.loop import Trainer

WORLD = 2
PAIRS = [("galaxy interleaved-1f1b V=2", "torch ScheduleInterleaved1F1B V=2"),
         ("galaxy zb-h1 V=1", "torch ScheduleInterleavedZeroBubble V=1")]
IDLE = [0.0]  # seconds blocked on point-to-point transfers in the current run


def _timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            IDLE[0] += time.perf_counter() - start
    return wrapper


StageLinks._recv, StageLinks.finish = _timed(StageLinks._recv), _timed(StageLinks.finish)
torch_schedules._wait_batch_p2p = _timed(torch_schedules._wait_batch_p2p)


class TorchChunk(nn.Module):
    """Positional-argument view of one chunk of a Galaxy rank model, as torch's PipelineStage calls it."""

    def __init__(self, model, chunk, first):
        super().__init__()
        self.model, self.chunk, self.first = model, chunk, first

    def forward(self, x):
        if self.first:
            return self.model(input_ids=x, chunk=self.chunk)
        return self.model(hidden_states=x, chunk=self.chunk)  # the last chunk returns logits: no labels


def _torch_predicted(schedule, chunks):
    """torch's own plan (pipeline_order) as Galaxy actions, simulated like Galaxy's."""
    kinds = {"F": "F", "I": "B", "W": "W", "B": "B"}
    lists = [[Action(kinds[a.computation_type.value], a.microbatch_index, a.stage_index // WORLD)
              for a in schedule.pipeline_order[r] if a is not None] for r in range(WORLD)]
    return simulate(lists, chunks)[1]


def _galaxy_predicted(name, m, chunks):
    return simulate([schedule_actions(name, WORLD, r, m, chunks) for r in range(WORLD)], chunks)[1]


def _setup(rank, cfg, batch, n_tokens):
    """One rank's model, its Galaxy pipeline step and its torch stages (one per chunk)."""
    ctx = ParallelContext.create(build_plan(cfg, WORLD), rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]), 1,
                      log=lambda *_: None)
    chunks = cfg["virtual_stages"]
    stages = [PipelineStage(TorchChunk(model, c, first=c == 0 and rank == 0), c * WORLD + rank, WORLD * chunks,
                            torch.device("cpu")) for c in range(chunks)]
    return model, trainer, stages


def bench(rank, world, cfgs, iters):
    data = SyntheticMLM(cfgs[1]["vocab_size"], cfgs[1]["seq_length"], cfgs[1]["seed"])
    batch = data.get_batch(range(cfgs[1]["batch_size"]))
    n_tokens = float((batch["labels"] != -100).sum())
    m = cfgs[1]["num_microbatches"]

    def loss_fn(logits, labels):  # Galaxy's normalisation: sum / label tokens of the batch
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / n_tokens

    runners, predicted, models = {}, {}, {}
    for chunks, cfg in cfgs.items():
        model, trainer, stages = _setup(rank, cfg, batch, n_tokens)
        galaxy = ("1f1b", "zb-h1") if chunks == 1 else ("interleaved-1f1b",)
        theirs = {1: [ScheduleInterleavedZeroBubble], 2: [ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble]}
        for name in galaxy:
            ours = PipelineForwardBackward(trainer)
            ours.schedule = name
            runners[f"galaxy {name} V={chunks}"] = lambda ours=ours: ours([batch], n_tokens)
            predicted[f"galaxy {name} V={chunks}"] = _galaxy_predicted(name, m, chunks)
        for cls in theirs[chunks]:
            schedule = cls(stages, m, loss_fn=loss_fn, scale_grads=False)
            key = f"torch {cls.__name__} V={chunks}"
            runners[key] = lambda s=schedule, tied=ours.tied: (s.step(
                *([batch["input_ids"]] if rank == 0 else []),
                **({"target": batch["labels"]} if rank == WORLD - 1 else {})), tied.all_reduce())
            predicted[key] = _torch_predicted(schedule, chunks)
        models.update({key: model for key in runners if key not in models})

    times, idle, grads = {k: [] for k in runners}, {k: [] for k in runners}, {}
    names = list(runners)
    for it in range(iters + 2):  # two warm-up rounds (torch infers shapes on its first step)
        for name in names[it % len(names):] + names[:it % len(names)]:  # order rotated: load hits all alike
            run = runners[name]
            dist.barrier()
            IDLE[0] = 0.0
            start = time.perf_counter()
            run()
            elapsed = torch.tensor([time.perf_counter() - start, IDLE[0]])
            slowest, idle_sum = elapsed.clone(), elapsed.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.all_reduce(idle_sum)
            grads[name] = {n: p.grad.clone() for n, p in models[name].named_parameters()}
            models[name].zero_grad(set_to_none=True)
            if it >= 2:
                times[name].append(slowest[0].item())
                idle[name].append(idle_sum[1].item() / (world * slowest[0].item()))
    refs = {id(models[k]): grads[k] for k in runners if k.startswith("galaxy")}  # one per model (V)
    worst = max(((g - refs[id(models[k])][n]).norm() / refs[id(models[k])][n].norm()).item()
                for k in grads for n, g in grads[k].items() if refs[id(models[k])][n].norm() > 1e-6)
    return ({k: (statistics.median(times[k]), statistics.median(idle[k]), predicted[k]) for k in runners}, worst)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers_per_chunk", type=int, default=1)
    args = parser.parse_args()
    n = args.layers_per_chunk
    base = {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_attention_heads": 4,
            "num_hidden_layers": 4 * n, "vocab_size": 8000, "seq_length": args.seq, "batch_size": args.batch,
            "num_microbatches": args.microbatches, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "data": "synthetic"}
    cfgs = {1: load_config(None, {**base, "stage_num_hidden_layers_list": [2 * n, 2 * n]}),
            2: load_config(None, {**base, "stage_num_hidden_layers_list": [n] * 4, "virtual_stages": 2,
                                  "pipeline_schedule": "interleaved-1f1b"})}
    results, worst = spawn(bench, WORLD, (cfgs, args.iters), timeout_s=1800)[0]
    print(f"BERT hidden {args.hidden}, {4 * n} layers ({n} per chunk), batch {args.batch} x seq {args.seq}, "
          f"{args.microbatches} micro-batches, world {WORLD} gloo, median of {args.iters} steps (forward+backward)")
    print(f"  {'schedule':42s} {'step ms':>9s} {'vs galaxy 1f1b':>15s} {'bubble measured':>16s} {'predicted':>10s}")
    base_ms = results["galaxy 1f1b V=1"][0]
    for name, (seconds, measured, pred) in results.items():
        print(f"  {name:42s} {seconds * 1e3:9.1f} {seconds / base_ms:15.2f} {measured:16.2f} {pred:10.2f}")
    for ours, theirs in PAIRS:
        print(f"  {ours} / {theirs}: {results[ours][0] / results[theirs][0]:.2f}")
    print(f"  gradients, worst relative difference between the runs on the same chunks: {worst:.2e}")


if __name__ == "__main__":
    main()
