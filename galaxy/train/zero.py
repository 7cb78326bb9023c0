"""ZeRO over the data-parallel group: each replica keeps a shard of AdamW's state (stage 1), also
only a shard of the summed gradients (2), also only a shard of the parameters (3). Shards follow
`zero_shard_list` (one fraction per data-parallel rank: a device with more memory holds more).

The sharded parameters are grouped in units, one per layer (each child of the model's layer
ModuleList/ModuleDict) and one for the rest (embeddings, heads, norms: the root). A unit's
parameters are views of one flat buffer; rank r owns the slice `sizes[r]` of it.

  * gradients: a unit's flat gradient is reduce-scattered over the group. Stage 1 does it after
    backward; stages 2 and 3 as soon as the unit's last gradient is accumulated during the last
    backward of the step (in unit order, the same on every rank), freeing the full gradients.
  * step: ZeroAdamW steps this rank's slice of every unit, then (stages 1, 2) all-gathers the
    updated slices into the flat buffers.
  * stage 3: a unit's flat buffer is allocated only while the unit runs: gathered in the forward
    pre-hook of its layer (the next layer's gather started meanwhile), freed after its forward,
    gathered again when the gradient of its output arrives in backward, and freed once its
    parameters' gradients are in. The root is gathered when the model is called and freed after
    the step's backward.

Parameters whose gradient has another reduction stay whole and use the plain path (GradSync and
torch's AdamW): GradSum.STAGE ones summed over the tensor group, and the weights a pipeline's first
and last stages share (summed between the two stages after the data-parallel sum).
"""
import time
from contextlib import contextmanager
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn

from galaxy.comm import stats
from galaxy.comm.collectives import start_all_gather, start_reduce_scatter
from galaxy.errors import ConfigError
from galaxy.layers.param_spec import GradSum, spec_of
from galaxy.train.grad_sync import GradSync, grad_groups, is_split


def check_zero(cfg, plan):
    """The ZeRO keys against the plan: there must be replicas to shard over, one fraction each; a
    shard key without zero_stage would silently train plain data parallelism."""
    zero = cfg.zero
    shard_keys = {"zero_shard_list": zero.zero_shard_list, "memory_mb": zero.memory_mb}
    if not zero.zero_stage:
        for key, value in shard_keys.items():
            if value is not None:
                raise ConfigError(f"config key '{key}' {value} has no effect without zero_stage: it sets ZeRO's "
                                  f"shards; set zero_stage 1, 2 or 3, or leave {key} out")
        return
    if plan.dp_size == 1:
        raise ConfigError(f"config key 'zero_stage' is {zero.zero_stage} but there is no data-parallel group "
                          f"(data_parallel_size 1): ZeRO shards over data-parallel replicas")
    for key, value in shard_keys.items():
        if value is not None and len(value) != plan.dp_size:
            raise ConfigError(f"config key '{key}' has {len(value)} entries for {plan.dp_size} "
                              f"data-parallel ranks")
    if zero.zero_stage == 3 and cfg.loop.activation_checkpointing:
        raise ConfigError("config key 'zero_stage' 3 does not combine with activation_checkpointing (a "
                          "recomputed layer would free its weights before its backward)")


def shard_fractions(cfg, dp_size):
    """Each data-parallel rank's share: zero_shard_list, else in proportion to memory_mb, else even."""
    if cfg.zero.zero_shard_list is not None:
        return cfg.zero.zero_shard_list
    memory = cfg.zero.memory_mb or [1] * dp_size
    return [m / sum(memory) for m in memory]


def shard_sizes(n, fractions):
    """Split n elements by fractions (summing to 1): rounded cumulative bounds, the last exactly n."""
    bounds = [round(n * sum(fractions[:r + 1])) for r in range(len(fractions) - 1)] + [n]
    return [b - a for a, b in zip([0] + bounds[:-1], bounds, strict=True)]


def sharded_params(model, ctx):
    """The trainable parameters whose gradients are summed over the data-parallel group only (not
    the weights a pipeline's first and last stages share: they are summed between the two too)."""
    over_stage = {id(p) for p in grad_groups(model, ctx)[0][1]}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in over_stage
            and spec_of(p).grad_sum is not GradSum.TIED and not spec_of(p).has_tied_copy]


def _unit_modules(model):
    """The outermost children of ModuleLists/ModuleDicts (the layers), in forward (definition) order."""
    found, inside = [], set()
    for m in model.modules():
        if id(m) in inside or not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        for child in m.children():
            found.append(child)
            inside.update(id(d) for d in child.modules())
    return found


class Unit:
    """Parameters as views of one flat buffer `full`; this rank's slice of it is `shard` (a view of
    `full`, or with `own_shard` its own tensor, so `full` can be freed: stage 3)."""

    def __init__(self, params, group, fractions, own_shard):
        self.params, self.group = params, group
        *self.offsets, n = accumulate((p.numel() for p in params), initial=0)  # each one's start; the total
        self.sizes = shard_sizes(n, fractions)
        self.lo = sum(self.sizes[:group.rank()])
        self.hi = self.lo + self.sizes[group.rank()]
        self.full = torch.cat([p.detach().reshape(-1) for p in params])
        for p, offset in zip(params, self.offsets, strict=True):
            p.data = self.full[offset: offset + p.numel()].view_as(p)
        self.shard = self.full[self.lo: self.hi]
        if own_shard:
            self.shard = self.shard.clone()
        self.gathered, self.gathering, self.reducing, self.grad = True, None, None, None
        self.used = sum(spec_of(p).used_here for p in params)  # gradients one backward brings
        self.waiting, self.ready = self.used, False

    def segments(self):
        """(parameter, slice of the shard, slice of the parameter's flat view) for each parameter
        overlapping this rank's shard."""
        for p, offset in zip(self.params, self.offsets, strict=True):
            lo, hi = max(offset, self.lo), min(offset + p.numel(), self.hi)
            if lo < hi:
                yield p, slice(lo - self.lo, hi - self.lo), slice(lo - offset, hi - offset)

    # ---- parameters
    def start_gather(self):
        if not self.gathered and self.gathering is None:
            self.gathering = (start_all_gather(self.shard, 0, self.sizes, self.group), time.perf_counter())

    def gather(self, phase=None):
        """Make `full` hold every rank's current shard (waits for a prefetch started earlier). Reported
        in `phase`: the step's (stages 1, 2), else the pass that needs the weights (stage 3)."""
        self.start_gather()
        if self.gathering is not None:
            pending, start = self.gathering
            flat, self.gathering = pending.wait(), None
            with stats.site("ZeRO parameters"):  # what it sends
                stats.record("all_gather", self.shard, phase, start, time.perf_counter() - start)
            storage = self.full.untyped_storage()
            if storage.nbytes() == 0:  # freed (stage 3): the views keep their shapes, the bytes come back
                storage.resize_(self.full.numel() * self.full.element_size())
            with torch.no_grad():
                self.full.copy_(flat)
            self.gathered = True

    def free(self):
        """Release `full` (stage 3); autograd's saved views of it see the bytes again on the next gather."""
        if self.gathering is not None:
            self.gather()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    # ---- gradients
    def start_reduce(self):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        for p in self.params:  # the full gradient is no longer needed once its sum is under way
            p.grad = None
        self.reducing = (start_reduce_scatter(flat, 0, self.sizes, self.group), flat, time.perf_counter())

    def finish_reduce(self):
        pending, flat, start = self.reducing
        self.grad, self.reducing = pending.wait(), None
        with stats.site("ZeRO gradients"):
            stats.record("reduce_scatter", flat, stats.GRAD, start, time.perf_counter() - start)


class Zero:
    """The trainer's gradient sync under ZeRO (arm / finish as GradSync), the units, and their
    stage-3 hooks. The whole parameters are synced by a GradSync of their own."""

    def __init__(self, model, ctx, cfg):
        check_zero(cfg, ctx.plan)  # for trainers built without the command line's check
        self.stage, self.ctx = cfg.zero.zero_stage, ctx
        fractions = shard_fractions(cfg, ctx.plan.dp_size)
        managed = sharded_params(model, ctx)
        self.whole = GradSync(model, ctx, cfg.loop.bucket_size_mb, exclude=managed)
        ids, layers, claimed = {id(p) for p in managed}, [], set()
        for module in _unit_modules(model):
            params = [p for p in module.parameters() if id(p) in ids and id(p) not in claimed]
            claimed.update(id(p) for p in params)
            if params:
                layers.append((module, Unit(params, ctx.dp_group, fractions, self.stage == 3)))
        rest = [p for p in managed if id(p) not in claimed]
        self.layers = [u for _, u in layers]
        self.root = Unit(rest, ctx.dp_group, fractions, self.stage == 3) if rest else None
        self.units = self.layers + ([self.root] if self.root else [])
        self.order = self.layers[::-1] + ([self.root] if self.root else [])  # roughly as backward brings them
        self.armed, self.next = False, 0
        self.unit_of = {p: u for u in self.units for p in u.params}
        if self.stage >= 2:
            for p in self.unit_of:
                p.register_post_accumulate_grad_hook(self._ready)
        if self.stage == 3:
            self._hook(model, [m for m, _ in layers])
            for u in self.units:
                u.free()

    # ---- gradient sync
    def arm(self):
        self.whole.arm()
        self.armed, self.next = True, 0
        for u in self.units:
            u.waiting, u.ready = u.used, False

    def _ready(self, p):
        u = self.unit_of[p]
        u.waiting -= 1
        if u.waiting:
            return
        u.waiting = u.used  # the next micro-batch's backward counts again
        if self.stage == 3 and u is not self.root:  # the root's weights serve both ends of the model
            u.free()
        if self.armed and self.stage >= 2:
            u.ready = True
            while self.next < len(self.order) and self.order[self.next].ready:  # same order on every rank
                self.order[self.next].start_reduce()
                self.next += 1

    def finish(self):
        """Reduce-scatter what backward has not started, wait for every unit's gradient shard.
        Once per arm(): a pipeline stage calls it before the trainer does."""
        self.whole.finish()
        if not self.armed:
            return
        for u in self.order[self.next:]:
            u.start_reduce()
        for u in self.order:
            u.finish_reduce()
        if self.stage == 3:
            for u in self.units:
                u.free()
        self.armed, self.next = False, 0

    # ---- gradient norm (galaxy.train.grad_sync.clip_grad_norm)
    def squares(self):
        """[squares of tensor-split, of replicated gradient entries] over the whole data-parallel group."""
        sums = torch.zeros(2, device=self.ctx.device)
        for u in self.units:
            for p, part, _ in u.segments():
                sums[0 if is_split(p, self.ctx) else 1] += u.grad[part].detach().float().pow(2).sum()
        dist.all_reduce(sums, group=self.ctx.dp_group)
        return sums

    def scale_(self, factor):
        for u in self.units:
            u.grad.mul_(factor)

    # ---- parameters
    def refresh(self):
        """After the step (stages 1, 2): every rank's updated shard into each unit's `full`."""
        for u in self.units:
            u.gathered = False
            u.start_gather()
        for u in self.units:
            u.gather(stats.STEP)

    @contextmanager
    def gathered(self):
        """Every parameter whole for the block (checkpoints, exports); under stage 3 writes to them
        go back into the shards."""
        if self.stage < 3:
            yield
            return
        for u in self.units:
            u.gather()
        try:
            yield
        finally:
            for u in self.units:
                u.shard.copy_(u.full[u.lo: u.hi])
                u.free()

    def _hook(self, model, modules):
        if self.root:
            model.register_forward_pre_hook(lambda *_: self.root.gather())
        for i, (module, u) in enumerate(zip(modules, self.layers, strict=True)):
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            before = self.layers[i - 1] if i else None
            module.register_forward_pre_hook(lambda m, args, u=u, nxt=after: self._use(u, nxt))
            module.register_forward_hook(lambda m, args, out, u=u, prev=before: self._after_forward(u, prev, out))

    def _use(self, unit, upcoming):
        unit.gather()
        if upcoming is not None:
            upcoming.start_gather()  # prefetch: its exchange runs while this unit computes

    def _after_forward(self, unit, previous, out):
        unit.free()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if torch.is_tensor(t) and t.requires_grad:  # its gradient arrives just before this unit's backward
                t.register_hook(lambda grad: self._use(unit, previous))


class ZeroAdamW(torch.optim.AdamW):
    """torch's AdamW for the whole parameters (the sharded ones carry no .grad at step time) and the
    same arithmetic on this rank's slice of each unit. state_dict() is torch AdamW's unsharded
    format (collective: gathers the moments), so a checkpoint resumes under any stage or plain DP."""

    def __init__(self, groups, zero, **kwargs):
        super().__init__(groups, **kwargs)
        self.zero, self.zero_step = zero, 0
        self.moments = [(torch.zeros_like(u.shard), torch.zeros_like(u.shard)) for u in zero.units]

    @torch.no_grad()
    def step(self, closure=None):
        super().step()
        self.zero_step += 1
        group_of = {p: g for g in self.param_groups for p in g["params"]}  # load_state_dict replaces the groups
        for u, (m, v) in zip(self.zero.units, self.moments, strict=True):
            for p, part, _ in u.segments():
                _adamw(u.shard[part], u.grad[part], m[part], v[part], self.zero_step, group_of[p])
        if self.zero.stage < 3:
            self.zero.refresh()

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for u in self.zero.units:
            u.grad = None

    def _index(self):
        """Parameter -> its index in state_dict()'s numbering (parameters in group order)."""
        return {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self):
        out = super().state_dict()
        if not self.zero_step:
            return out
        index = self._index()
        for u, moments in zip(self.zero.units, self.moments, strict=True):
            m, v = (start_all_gather(t, 0, u.sizes, u.group).wait() for t in moments)
            for p, offset in zip(u.params, u.offsets, strict=True):
                n = p.numel()
                out["state"][index[p]] = {"step": torch.tensor(float(self.zero_step)),
                                          "exp_avg": m[offset: offset + n].view_as(p).clone(),
                                          "exp_avg_sq": v[offset: offset + n].view_as(p).clone()}
        return out

    def load_state_dict(self, state_dict):
        index, state = self._index(), state_dict["state"]
        sharded = {index[p] for p in self.zero.unit_of}
        super().load_state_dict({"state": {i: s for i, s in state.items() if i not in sharded},
                                 "param_groups": state_dict["param_groups"]})
        self.zero_step = 0
        for u, (m, v) in zip(self.zero.units, self.moments, strict=True):
            m.zero_()
            v.zero_()
            for p, part, in_p in u.segments():
                saved = state.get(index[p])
                if saved:
                    self.zero_step = int(saved["step"])
                    m[part] = saved["exp_avg"].reshape(-1)[in_p].to(m)
                    v[part] = saved["exp_avg_sq"].reshape(-1)[in_p].to(v)


def _adamw(param, grad, exp_avg, exp_avg_sq, step, group):
    """torch.optim.AdamW's single-tensor update (decoupled weight decay, bias correction), in place."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    param.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def model_state_bytes(trainer):
    """{params, grads, optimizer}: bytes this rank holds for the model state, from the tensors' sizes.
    Parameters: the storages allocated now (plus stage-3 shards). Gradients: what a step keeps, full
    for plain DP and stage 1 (torch accumulates them whole), the shards plus whole parameters' for
    stages 2, 3. Optimizer: AdamW's two moments of what this rank steps, and torch AdamW's float32
    step count per whole parameter. Sizes only, so it counts a model built on the meta device too
    (galaxy.profiler.memory)."""
    zero, trainable = trainer.zero, [p for p in dict.fromkeys(trainer.model.parameters()) if p.requires_grad]
    storages = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in trainer.model.parameters()}
    params = sum(storages.values())  # a freed stage-3 buffer holds 0 bytes
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    if zero is None:
        return {"params": params, "grads": nbytes(trainable), "optimizer": 2 * nbytes(trainable) + 4 * len(trainable)}
    shards = sum(u.shard.numel() * u.shard.element_size() for u in zero.units)
    whole = [p for p in trainable if p not in zero.unit_of]
    return {"params": params + (shards if zero.stage == 3 else 0),
            "grads": nbytes(trainable) if zero.stage == 1 else nbytes(whole) + shards,
            "optimizer": 2 * (nbytes(whole) + shards) + 4 * len(whole)}
