"""The training loop shared by every layout.

One optimizer step = `gradient_accumulation_steps` micro-steps of the global `batch_size`
samples. Each data-parallel replica takes its contiguous share of every micro-step's samples.
The loss is the sum of token losses divided by the number of label tokens of the whole
optimizer step over all replicas, so any layout's gradients equal the serial model's.
"""
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy.data import batch_indices
from galaxy.layers.dropout import set_dropout_seed
from galaxy.train.grad_sync import GradSync, clip_grad_norm
from galaxy.train.optim import build_optimizer, optimizer_state_bytes


def replica_share(indices, ctx):
    """This data-parallel replica's contiguous share of a micro-step's sample indices."""
    n, dp = len(indices), ctx.plan.dp_size
    if n % dp:
        raise ValueError(f"batch_size {n} does not split over {dp} data-parallel replicas")
    per = n // dp
    return indices[ctx.dp_rank * per: (ctx.dp_rank + 1) * per]


def sum_over(value, *groups):
    t = torch.tensor(float(value), dtype=torch.float64)
    for group in groups:
        if group is not None:
            dist.all_reduce(t, group=group)
    return t.item()


def label_tokens(model, labels):
    """Tokens that carry loss, as the model counts them (a causal LM skips position 0)."""
    count = getattr(model, "label_tokens", None)
    return count(labels) if count else (labels != -100).sum()


class Trainer:
    """Owns the model, optimizer, schedule and gradient sync of one rank.

    `forward_backward(batches, n_tokens)` runs the micro-steps of one optimizer step and
    returns this rank's share of the loss sum; the pipeline schedules replace it.
    """

    def __init__(self, model, ctx, cfg, data, total_steps, forward_backward=None, log=print):
        self.model, self.ctx, self.cfg, self.data, self.log = model, ctx, cfg, data, log
        self.total_steps = total_steps
        self.opt, self.sched = build_optimizer(model, cfg, total_steps)
        self.sync = GradSync(model, ctx, cfg["bucket_size_mb"])
        self.forward_backward = forward_backward or self._forward_backward
        self.autocast = torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16) \
            if cfg["dtype"] == "bf16" else nullcontext()
        self.step = 0
        self.before_update = None  # called with the synced, clipped gradients in place (tests, debugging)

    def micro_batches(self, step):
        """This replica's batches for every micro-step of optimizer step `step`."""
        accum, size = self.cfg["gradient_accumulation_steps"], self.cfg["batch_size"]
        out = []
        for micro in range(accum):
            indices = batch_indices(step * accum + micro, size, len(self.data), self.cfg["seed"])
            out.append(self.data.get_batch(replica_share(indices, self.ctx)))
        return out

    def _forward_backward(self, batches, n_tokens):
        total = 0.0
        for micro, batch in enumerate(batches):
            set_dropout_seed(self.model, self.cfg["seed"], self.step, micro, self.ctx.dp_rank)
            if micro == len(batches) - 1:
                self.sync.arm()  # reduce gradients during the last backward only
            with self.autocast:
                loss_sum, _ = self.model(**batch)
            (loss_sum / n_tokens).backward()
            total += loss_sum.item()
        return total

    def train_step(self):
        start = time.perf_counter()
        self.model.train()
        batches = self.micro_batches(self.step)
        local_tokens = sum(int(label_tokens(self.model, b["labels"])) for b in batches)
        n_tokens = max(1.0, sum_over(local_tokens, self.ctx.dp_group))
        loss_sum = self.forward_backward(batches, n_tokens)
        self.sync.finish()
        grad_norm = clip_grad_norm(self.model, self.ctx, self.cfg["max_grad_norm"])
        lr = self.sched.get_last_lr()[0]
        if self.before_update:
            self.before_update()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss = sum_over(loss_sum, self.ctx.dp_group, self.ctx.pp_group) / n_tokens
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = self.cfg["batch_size"] * self.cfg["gradient_accumulation_steps"] * self.cfg["seq_length"]
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed, "step_time_s": elapsed}


def is_reporting_rank(ctx):
    """One rank that holds the loss: first tensor rank of the first replica of the last stage."""
    return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0


def run_training(trainer, max_steps, metrics_file=None, on_step=None):
    ctx = trainer.ctx
    writer = open(Path(metrics_file), "a") if metrics_file and is_reporting_rank(ctx) else None
    try:
        while trainer.step < max_steps:
            metrics = trainer.train_step()
            if is_reporting_rank(ctx) and (metrics["step"] % trainer.cfg["log_every"] == 0 or metrics["step"] == 1):
                trainer.log(f"step {metrics['step']:5d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                            f"grad_norm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s | "
                            f"{metrics['step_time_s'] * 1e3:.0f} ms")
            if writer:
                writer.write(json.dumps(metrics) + "\n")
                writer.flush()
            if on_step:
                on_step(metrics)
    finally:
        if writer:
            writer.close()
    trainer.log(f"optimizer state on this rank: {optimizer_state_bytes(trainer.opt) / 2**20:.1f} MiB")
