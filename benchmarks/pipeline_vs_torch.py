"""Galaxy's GPipe / 1F1B against torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B.

Both run the same BERT stages (Galaxy's BertForMaskedLM built per stage: embeddings + layers
on the first, layers + MLM head on the last), the same batch and micro-batches, world 2 on
gloo, in one run, alternating iterations. Timed: one forward+backward of the whole batch
(no optimizer step), slowest rank, median over iterations. Both losses are the token-loss
sum over the batch's label count, so the engines' gradients must agree; that is checked too.
torch knows nothing of the tied embedding/decoder pair, so its timed step includes the same
first/last-stage gradient sum Galaxy's does (TiedCopies), as a torch user would have to add.

    python -m benchmarks.pipeline_vs_torch [--iters 10] [--microbatches 4] [--seq 128]
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.runtime.launch import spawn
from galaxy.train.loop import Trainer

TORCH_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class TorchStage(nn.Module):
    """Positional-argument view of a Galaxy stage, as torch's PipelineStage calls it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if self.model.ctx.is_first_stage:
            return self.model(input_ids=x)
        return self.model(hidden_states=x)  # the last stage returns logits when given no labels


def _slowest(seconds):
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def bench(rank, world, cfg, iters):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    data = SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"])
    batch = data.get_batch(range(cfg["batch_size"]))
    n_tokens = float((batch["labels"] != -100).sum())
    trainer = Trainer(model, ctx, cfg, data, 1, log=lambda *_: None)
    m = cfg["num_microbatches"]

    def loss_fn(logits, labels):  # the same normalisation as Galaxy's: sum / label tokens of the batch
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / n_tokens

    stage = PipelineStage(TorchStage(model), ctx.pp_rank, ctx.plan.pp_size, torch.device("cpu"))
    runners = {}
    for name in ("gpipe", "1f1b"):
        ours = PipelineForwardBackward(trainer)
        ours.schedule = name
        theirs = TORCH_SCHEDULES[name](stage, m, loss_fn=loss_fn, scale_grads=False)
        runners[f"galaxy {name}"] = lambda ours=ours: ours([batch], n_tokens)
        runners[f"torch {name}"] = lambda theirs=theirs, tied=ours.tied: (theirs.step(
            *([batch["input_ids"]] if ctx.is_first_stage else []),
            **({"target": batch["labels"]} if ctx.is_last_stage else {})), tied.all_reduce())

    times, grads = {k: [] for k in runners}, {}
    for it in range(iters + 2):  # two warm-up rounds (torch infers shapes on its first step)
        for name, run in runners.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            elapsed = _slowest(time.perf_counter() - start)
            grads[name] = _grads(model)
            if it >= 2:
                times[name].append(elapsed)
    worst = max(((g - grads["galaxy 1f1b"][n]).norm() / grads["galaxy 1f1b"][n].norm().clamp_min(1e-12)).item()
                for k in grads for n, g in grads[k].items() if grads["galaxy 1f1b"][n].norm() > 1e-6)
    return {k: statistics.median(v) for k, v in times.items()}, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 2], help="layers per stage")
    args = parser.parse_args()
    cfg = load_config(None, {
        "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_attention_heads": 4,
        "num_hidden_layers": sum(args.layers), "stage_num_hidden_layers_list": args.layers,
        "vocab_size": 8000, "seq_length": args.seq, "batch_size": args.batch, "num_microbatches": args.microbatches,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "data": "synthetic"})
    times, worst = spawn(bench, 2, (cfg, args.iters), timeout_s=1200)[0]
    print(f"BERT hidden {args.hidden}, layers per stage {args.layers}, batch {args.batch} x seq {args.seq}, "
          f"{args.microbatches} micro-batches, world 2 gloo, median of {args.iters} steps (forward+backward)")
    for name in ("gpipe", "1f1b"):
        ours, theirs = times[f"galaxy {name}"], times[f"torch {name}"]
        print(f"  {name:6s} galaxy {ours * 1e3:8.1f} ms   torch {theirs * 1e3:8.1f} ms   "
              f"galaxy/torch {ours / theirs:5.2f}")
    print(f"  gradients, worst relative difference between all four runs: {worst:.2e}")


if __name__ == "__main__":
    main()
