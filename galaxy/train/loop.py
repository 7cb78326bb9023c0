"""The training loop shared by every layout.

One optimizer step = `gradient_accumulation_steps` micro-steps of the global `batch_size`
samples. Each data-parallel replica takes its contiguous share of every micro-step's samples;
dropout masks are keyed by each sample's position in the step (galaxy.layers.dropout), so a
sample draws the same mask on any replica and micro-step.
The loss is the sum of token losses divided by the number of label tokens of the whole
optimizer step over all replicas, so any layout's gradients equal the serial model's.

A step whose loss or gradient norm is not finite on any rank takes no optimizer step; the run
then stops (on_nonfinite "stop") or goes on with the next batch ("skip", as Megatron skips a step
whose gradients overflowed; the LR schedule does not advance either). Its keys are the config's
loop section (galaxy.config.sections.LoopConfig).
"""
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy.data import DataError, batch_indices
from galaxy.layers.dropout import set_dropout_seed
from galaxy.train.grad_sync import GradSync, clip_grad_norm
from galaxy.train.optim import build_optimizer, optimizer_state_bytes
from galaxy.train.zero import Zero


def replica_rows(n, ctx):
    """This data-parallel replica's contiguous share (a range) of a micro-step's n samples."""
    dp = ctx.plan.dp_size
    if n % dp:
        raise ValueError(f"batch_size {n} does not split over {dp} data-parallel replicas")
    per = n // dp
    return range(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)


def sum_over(value, device, *groups):
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    for group in groups:
        if group is not None:
            dist.all_reduce(t, group=group)
    return t.item()


def all_finite(ctx, *values):
    """True on every rank iff every rank's values are finite: the ranks must skip or stop together."""
    bad = torch.tensor(float(not all(math.isfinite(v) for v in values)), device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with on_nonfinite "stop"."""


def label_tokens(model, labels):
    """Tokens that carry loss, as the model counts them (a causal LM skips position 0)."""
    count = getattr(model, "label_tokens", None)
    return count(labels) if count else (labels != -100).sum()


class Trainer:
    """Owns the model, context, config and optimizer of one rank (galaxy.reshard.relayout moves
    them together, as it moves a Holding), the LR schedule and the gradient sync.

    `forward_backward(batches, n_tokens)` runs the micro-steps of one optimizer step and
    returns this rank's share of the loss sum; the pipeline schedules replace it.
    """

    def __init__(self, model, ctx, cfg, data, total_steps, log=print):
        self.model, self.ctx, self.cfg, self.data, self.log = model, ctx, cfg, data, log
        self.total_steps = total_steps
        if cfg.loop.dtype == "bf16_pure":  # parameters, gradients and optimizer state in bf16
            model.to(torch.bfloat16)
        self.zero = Zero(model, ctx, cfg) if cfg.zero.zero_stage else None
        self.opt, self.sched = build_optimizer(model, cfg, total_steps, self.zero)
        self.sync = self.zero or GradSync(model, ctx, cfg.loop.bucket_size_mb)
        self.autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if cfg.loop.dtype == "bf16" \
            else nullcontext()
        self.step = 0
        self.skipped = 0  # steps of this run that took no optimizer step (on_nonfinite skip)
        self.before_update = None  # called with the synced, clipped gradients in place (tests, debugging)

    def adopt(self, model, ctx, cfg):
        """Go on with `model`: the same weights under another split on the same ranks, the optimizer
        already pointed at them (galaxy.reshard.relayout.move); gradient sync follows the new parameters."""
        self.model, self.ctx, self.cfg = model, ctx, cfg
        self.sync = GradSync(model, ctx, cfg.loop.bucket_size_mb)

    def full_weights(self):
        """A block in which every parameter is whole (ZeRO-3 gathers its shards)."""
        return self.zero.gathered() if self.zero else nullcontext()

    def step_indices(self, step):
        """The global sample indices of every micro-step of optimizer step `step`."""
        accum, size = self.cfg.loop.gradient_accumulation_steps, self.cfg.data.batch_size
        with torch.device("cpu"):  # drawn from CPU generators: the same batches for every device
            return [batch_indices(step * accum + micro, size, len(self.data), self.cfg.loop.seed)
                    for micro in range(accum)]

    def micro_batches(self, step):
        """This replica's batches for every micro-step of optimizer step `step`."""
        every = self.step_indices(step)
        share = replica_rows(self.cfg.data.batch_size, self.ctx)  # the same for each micro-step
        with torch.device("cpu"):
            batches = [self.data.get_batch(indices[share.start:share.stop]) for indices in every]
        return [{k: v.to(self.ctx.device) for k, v in batch.items()} for batch in batches]

    def rows(self, micro):
        """The positions in the step's global batch of this replica's samples of micro-step `micro`."""
        size = self.cfg.data.batch_size
        share = replica_rows(size, self.ctx)
        return range(micro * size + share.start, micro * size + share.stop)

    def key_dropout(self, rows):
        """Key the dropout masks of a micro-batch of samples `rows` (positions in the step)."""
        samples = self.cfg.data.batch_size * self.cfg.loop.gradient_accumulation_steps
        set_dropout_seed(self.model, self.cfg.loop.seed, self.step, rows, samples)

    def forward_backward(self, batches, n_tokens):
        total = 0.0
        for micro, batch in enumerate(batches):
            self.key_dropout(self.rows(micro))
            if micro == len(batches) - 1:
                self.sync.arm()  # reduce gradients during the last backward only
            with self.autocast:
                loss_sum, _ = self.model(**batch)
            (loss_sum / n_tokens).backward()
            total += loss_sum.detach().double()  # summed as floats were; read once per step (never on meta)
        return total

    def train_step(self):
        start = time.perf_counter()
        self.model.train()
        batches = self.micro_batches(self.step)
        local_tokens = sum(int(label_tokens(self.model, b["labels"])) for b in batches)
        n_tokens = sum_over(local_tokens, self.ctx.device, self.ctx.dp_group)
        if n_tokens == 0:  # the same count on every rank, so all stop here; loss 0 would hide it
            raise DataError(f"step {self.step + 1}: samples {sorted(sum(self.step_indices(self.step), []))} carry no "
                            f"label token (is every prompt longer than seq_length {self.cfg.data.seq_length}?)")
        loss_sum = self.forward_backward(batches, n_tokens)
        self.sync.finish()
        grad_norm = clip_grad_norm(self.model, self.ctx, self.cfg.optim.max_grad_norm, self.zero)
        lr = self.sched.get_last_lr()[0]
        loss = sum_over(loss_sum, self.ctx.device, self.ctx.dp_group, self.ctx.pp_group) / n_tokens
        finite = all_finite(self.ctx, loss, grad_norm)
        if finite:
            if self.before_update:
                self.before_update()
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = self.cfg.data.batch_size * self.cfg.loop.gradient_accumulation_steps * self.cfg.data.seq_length
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "nonfinite": not finite}

    def on_nonfinite(self, metrics):
        """Stop, or note the skipped step, after a step that was not finite."""
        what = (f"step {metrics['step']}: non-finite loss or gradient norm on some rank (this rank: loss "
                f"{metrics['loss']}, grad_norm {metrics['grad_norm']})")
        if self.cfg.loop.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}; stopped before its optimizer step, so the weights are step "
                                 f"{metrics['step'] - 1}'s (--on_nonfinite skip skips such steps)")
        self.skipped += 1
        if is_reporting_rank(self.ctx):
            self.log(f"{what}: skipped its optimizer step (on_nonfinite skip)")


def json_line(metrics):
    """One metrics line; a non-finite number is written as null (a bare NaN is not JSON)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in metrics.items()}, allow_nan=False)


def is_reporting_rank(ctx):
    """One rank that holds the loss: first tensor rank of the first replica of the last stage."""
    return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0


def run_training(trainer, max_steps, metrics_file=None, on_step=None, around_step=nullcontext):
    """Steps until max_steps; each inside around_step() (galaxy.profiler.memory's report measures one), then
    logged, written to metrics_file and handed to on_step."""
    ctx = trainer.ctx
    writer = open(Path(metrics_file), "a") if metrics_file and is_reporting_rank(ctx) else None
    started, first_step = time.monotonic(), trainer.step
    try:
        while trainer.step < max_steps:
            with around_step():
                metrics = trainer.train_step()
            if is_reporting_rank(ctx) and (metrics["step"] % trainer.cfg.loop.log_every == 0 or metrics["step"] == 1):
                elapsed = time.monotonic() - started
                remaining = elapsed / (trainer.step - first_step) * (max_steps - trainer.step)
                trainer.log(f"step {metrics['step']}/{max_steps} | loss {metrics['loss']:.4f} | "
                            f"lr {metrics['lr']:.2e} | grad_norm {metrics['grad_norm']:.3f} | "
                            f"{metrics['tokens_per_s']:.0f} tok/s | {metrics['step_time_s'] * 1e3:.0f} ms | "
                            f"elapsed {_hms(elapsed)} | remaining {_hms(remaining)}")
            if writer:
                writer.write(json_line(metrics) + "\n")
                writer.flush()
            if metrics["nonfinite"]:
                trainer.on_nonfinite(metrics)
            if on_step:
                on_step(metrics)
    finally:
        if writer:
            writer.close()
    if trainer.cfg.loop.on_nonfinite == "skip" and is_reporting_rank(ctx):
        trainer.log(f"on_nonfinite skip: {trainer.skipped} of the {trainer.step - first_step} steps run took no "
                    f"optimizer step (non-finite loss or gradient norm)")
    trainer.log(f"optimizer state on this rank: {optimizer_state_bytes(trainer.opt) / 2**20:.1f} MiB")


def _hms(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
