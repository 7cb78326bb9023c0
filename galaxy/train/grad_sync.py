"""Gradient reduction that starts during backward (bucketed, asynchronous), as DDP does.

A parameter's ParamSpec.grad_sum says over which ranks its gradient is summed (the loss is
already divided by the global token count, so a sum gives the serial gradient): GradSum.STAGE
over the whole stage (tensor x data ranks), every other one over the data-parallel replicas,
each by its own GradBuckets (GradSum.TIED copies are then summed by the pipeline engine).
"""
import time

import torch
import torch.distributed as dist

from galaxy.comm import stats
from galaxy.comm.collectives import implementation
from galaxy.layers.param_spec import GradSum, spec_of


class GradBuckets:
    """Sum the grads of `params` over `group`, launching each bucket as soon as its last
    gradient is accumulated. Between `arm()` and `finish()` hooks are live (arm only on the
    last micro-batch of an accumulation, so earlier micro-batches accumulate locally)."""

    def __init__(self, params, group, bucket_mb=25.0):
        self.group, self.armed, self.pending, self.next_launch = group, False, [], 0
        self.buckets, current, size = [], [], 0
        for p in reversed(params):  # backward produces gradients roughly in reverse order
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_mb * 2**20:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.waiting = [len(b) for b in self.buckets]
        if group is not None:
            for p in params:
                p.register_post_accumulate_grad_hook(self._ready)

    def arm(self):
        if self.pending:  # re-arming would launch these buckets again, out of step with the other ranks
            raise RuntimeError("gradient sync armed again before finish(): arm() once per optimizer step, "
                               "before the last micro-batch's backward, and finish() after it")
        self.armed, self.next_launch = self.group is not None, 0
        # a parameter this rank never uses (a bias added on another rank) is ready from the start
        self.waiting = [sum(spec_of(p).used_here for p in b) for b in self.buckets]

    def _ready(self, p):
        if not self.armed:
            return
        self.waiting[self.bucket_of[p]] -= 1
        # launch in bucket order: every rank must issue its all-reduces in the same sequence
        while self.next_launch < len(self.buckets) and self.waiting[self.next_launch] == 0:
            self._launch(self.next_launch)

    def _launch(self, i):
        bucket = self.buckets[i]
        for p in bucket:  # a parameter unused on this rank (e.g. a bias added elsewhere) contributes 0
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        works, _ = implementation(self.group).all_reduce(flat, self.group)  # summed in place
        self.pending.append((bucket, flat, works, time.perf_counter()))
        self.next_launch = i + 1

    def finish(self):
        """Launch the buckets not launched yet, wait for all, copy the sums back."""
        if not self.armed:
            return
        while self.next_launch < len(self.buckets):
            self._launch(self.next_launch)
        for bucket, flat, works, start in self.pending:
            for work in works:  # the recorded span runs from launch until this wait returns
                work.wait()
            stats.record("all_reduce", flat, stats.GRAD, start, time.perf_counter() - start)
            for p, summed in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                p.grad.copy_(summed.view_as(p.grad))
        self.pending, self.armed = [], False


def grad_groups(model, ctx):
    """[(name, params, group, group size)]: GradSum.STAGE parameters summed over the stage, the rest
    over the data-parallel replicas (a group of size 1 moves nothing)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    stage = {id(p) for p in trainable if ctx.tp_size > 1 and spec_of(p).grad_sum is GradSum.STAGE}
    return [("stage", [p for p in trainable if id(p) in stage], ctx.stage_group, ctx.tp_size * ctx.plan.dp_size),
            ("data-parallel", [p for p in trainable if id(p) not in stage], ctx.dp_group, ctx.plan.dp_size)]


class GradSync:
    def __init__(self, model, ctx, bucket_mb=25.0, exclude=()):
        """exclude: parameters synced elsewhere (ZeRO's sharded ones)."""
        skip = {id(p) for p in exclude}
        self.parts = [GradBuckets([p for p in params if id(p) not in skip], group, bucket_mb)
                      for _, params, group, _ in grad_groups(model, ctx)]

    def arm(self):
        for part in self.parts:
            part.arm()

    def finish(self):
        for part in self.parts:
            part.finish()


def clip_grad_norm(model, ctx, max_norm, shards=None):
    """Global L2 norm over every rank's parameters, each counted once: split tensors' squares are
    summed over the tensor group, stages' over the pipeline; replicas hold equal grads. `shards`
    (galaxy.train.zero.Zero) adds the gradient shards ZeRO keeps instead of parameters' .grad."""
    sums = torch.zeros(2, device=ctx.device)  # squares of tensor-split, of replicated gradient entries
    for p in model.parameters():
        if p.grad is not None and spec_of(p).grad_sum is not GradSum.TIED:
            sums[0 if is_split(p, ctx) else 1] += p.grad.detach().float().pow(2).sum()
    if shards is not None:
        sums += shards.squares()
    split, replicated = sums.unbind()
    if ctx.tp_group is not None:
        dist.all_reduce(split, group=ctx.tp_group)
    total = split + replicated
    if ctx.pp_group is not None:
        dist.all_reduce(total, group=ctx.pp_group)
    norm = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if shards is not None:
            shards.scale_(scale)
    return norm.item()


def is_split(p, ctx):
    """This rank holds a slice of p (the others hold the rest): its gradient's square sums over ranks."""
    shard = spec_of(p).shard
    return ctx.tp_size > 1 and shard is not None and shard.length < shard.full
