"""Every rank's memory for a config, before anything runs (python -m galaxy.memory --config_file ...
--world N: galaxy.app.memory), and a training run's report of what it measured beside it
(--memory_report, MemoryReport).

Nothing is described a second time: each rank's real model and Trainer (ZeRO, tuning, pipeline
included) are built on the meta device under ParallelContext.recording, as --explain does, and
  * model state (parameters, gradients, AdamW's moments) is counted from the tensors it holds;
  * activations are the bytes autograd saves in one micro-batch's forward (saved-tensors hooks),
    with and without activation checkpointing;
  * the peak is the most live tensor bytes during one steady-state optimizer step (the second:
    AdamW's state exists), run on meta under LiveBytes, the same instrument `--measure` runs on
    real ranks (gloo, CPU) to compare, and a training run with --memory_report on its second step
    (on CUDA: torch.cuda.max_memory_allocated).
"""
import dataclasses
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from galaxy.comm.context import ParallelContext
from galaxy.models.registry import build_model
from galaxy.profiler.explain import batch, build_trainer, run_step
from galaxy.train.optim import optimizer_state_bytes
from galaxy.train.zero import model_state_bytes


def _key(t):
    return t.untyped_storage()._cdata  # one per storage, on meta too (where data_ptr is 0)


def saved_bytes(trainer):
    """Bytes autograd keeps for backward after one micro-batch's forward, each storage once,
    parameters not counted (they are model state)."""
    micro_batch = batch(trainer)
    own = {_key(p) for p in trainer.model.parameters()}
    saved = {}

    def pack(t):
        if _key(t) not in own:
            saved[_key(t)] = t.untyped_storage().nbytes()
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast:
        trainer.model(**micro_batch)
    return sum(saved.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are alive `now`, and their `peak`: a storage
    counts from the op that made it until the last tensor seen on it dies."""

    def __init__(self):
        super().__init__()
        self.refs, self.now, self.peak = {}, 0, 0  # storage -> [bytes, tensors alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (_key(t) in self.refs or _key(t) not in inputs):
                self._track(t)  # an in-place result on an older tensor is no new memory
        return out

    def add(self, nbytes):
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def _track(self, t):
        key = _key(t)
        if key not in self.refs:
            self.refs[key] = [t.untyped_storage().nbytes(), 0]
            self.add(self.refs[key][0])
        self.refs[key][1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if not entry[1]:
            self.add(-entry[0])
            del self.refs[key]


@contextmanager
def _following_resizes(live, zero):
    """ZeRO-3 frees and regrows a layer's flat buffer by resizing its storage, which no op shows:
    inside the block, after each gather and free, count what every buffer's size changed since
    last looked at."""
    units = zero.units if zero and zero.stage == 3 else []
    seen = [u.full.untyped_storage().nbytes() for u in units]

    def look():
        for i, u in enumerate(units):
            now = u.full.untyped_storage().nbytes()
            live.add(now - seen[i])
            seen[i] = now

    for u in units:
        for name in ("gather", "free"):
            def resized(*args, f=getattr(u, name)):
                f(*args)
                look()
            setattr(u, name, resized)
    try:
        yield
    finally:
        for u in units:  # the class's methods again
            del u.gather, u.free


def held_bytes(trainer):
    """Bytes this rank holds between steps: parameters (and ZeRO-3 shards), AdamW's state."""
    opt, zero = trainer.opt, trainer.zero
    tensors = list(trainer.model.parameters()) + [t for s in opt.state.values() for t in s.values()
                                                  if torch.is_tensor(t)]
    tensors += [t for pair in getattr(opt, "moments", ()) for t in pair]
    tensors += [u.shard for u in zero.units] if zero and zero.stage == 3 else []
    # each storage once, at its size now (a freed ZeRO-3 buffer holds 0)
    return sum({_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


@contextmanager
def step_peak(trainer):
    """`with step_peak(trainer) as peak:` one step; then `peak.bytes` is the most bytes the rank had
    alive during it: on CUDA the allocator's peak, elsewhere (CPU, meta) what the rank held before
    the block plus the peak of what LiveBytes saw the block create."""
    peak, device = SimpleNamespace(bytes=None), trainer.ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak.bytes = torch.cuda.max_memory_allocated(device)
        return
    held = held_bytes(trainer)
    with LiveBytes() as live, _following_resizes(live, trainer.zero):
        yield peak
    peak.bytes = held + live.peak


def peak_bytes(trainer):
    """The most bytes alive during the second optimizer step (the first creates AdamW's state)."""
    batches = [batch(trainer) for _ in range(trainer.cfg["gradient_accumulation_steps"])]
    run_step(trainer, batches)
    with step_peak(trainer) as peak:
        run_step(trainer, batches)
    return peak.bytes


def _meta_trainer(plan, cfg, rank, **loop_keys):
    cfg = cfg.replace(loop=dataclasses.replace(cfg.loop, **loop_keys))
    return build_trainer(ParallelContext.recording(plan, rank), cfg, build_model)


def predict(plan, cfg, rank):
    """Rank `rank`'s predicted model state (params, grads, optimizer) and step peak, in bytes."""
    trainer = _meta_trainer(plan, cfg, rank)
    return {**model_state_bytes(trainer), "peak": peak_bytes(trainer)}  # model state before any step


def estimate(plan, cfg, rank):
    """predict(), and the activations of one micro-batch with and without checkpointing (not under
    a pipeline, whose stages hold several; nor ZeRO-3, which refuses checkpointing)."""
    out = predict(plan, cfg, rank)
    for key, checkpointing in (("activations", False), ("activations_ckpt", True)):
        shown = plan.pp_size == 1 and not (checkpointing and cfg["zero_stage"] == 3)
        out[key] = saved_bytes(_meta_trainer(plan, cfg, rank, activation_checkpointing=checkpointing)) \
            if shown else None
    return out


def measure(rank, world, plan, cfg):
    """On a real rank (one of `world` joined in a process group): the peak of live bytes over a
    steady-state step."""
    return peak_bytes(build_trainer(ParallelContext.create(plan, rank, "cpu"), cfg, build_model))


def _mib(n):
    return "-" if n is None else f"{n / 2**20:.2f}"


def report(plan, cfg, measured=None):
    """The table of every rank's prediction; `measured`, when given, is each rank's peak from
    `measure`, shown beside it."""
    cols = ("params", "grads", "optimizer", "activations", "activations_ckpt", "peak")
    lines = [f"memory per rank, MiB (world {plan.world}: {plan.describe()}; zero_stage {cfg['zero_stage']}, "
             f"activation_checkpointing {cfg['activation_checkpointing']}, dtype {cfg['dtype']})",
             f"{'rank':>4} " + " ".join(f"{c:>16}" for c in cols) + (f" {'measured peak':>14} {'error':>7}" if measured else "")]
    for rank in range(plan.world):
        est = estimate(plan, cfg, rank)
        line = f"{rank:>4} " + " ".join(f"{_mib(est[c]):>16}" for c in cols)
        if measured:
            line += f" {_mib(measured[rank]):>14} {100 * (est['peak'] / measured[rank] - 1):>+6.1f}%"
        lines.append(line)
    lines.append("activations: bytes autograd saves in one micro-batch's forward; peak: most live bytes in a step")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a training run's report

MODEL_STATE = ("params", "grads", "optimizer")


def _model_state(state):
    return (f"{_mib(sum(state[k] for k in MODEL_STATE))} MiB = "
            + " + ".join(f"{k} {_mib(state[k])}" for k in MODEL_STATE))


def model_state_line(trainer, predicted=None):
    """A training rank's start-up line: the model state its tensors hold (model_state_bytes), beside
    the prediction when given."""
    held = _model_state(model_state_bytes(trainer))
    line = f"model state on this rank (zero_stage {trainer.cfg['zero_stage']}): {held}"
    return line + (f"; predicted {_model_state(predicted)}" if predicted else "")


class MemoryReport:
    """--memory_report: this rank's memory beside galaxy.profiler.memory's prediction of it (from a meta build
    of the rank: seconds), the model state at start-up and, once it has run, the peak of the second
    step this process runs (the first creates AdamW's state) with the optimizer state it left."""

    def __init__(self, trainer):
        self.trainer, self.steps_run = trainer, 0
        self.predicted = predict(trainer.ctx.plan, trainer.cfg, trainer.ctx.rank)

    def start_line(self):
        peak = self.predicted["peak"]
        return model_state_line(self.trainer, self.predicted) + f"; step peak predicted {_mib(peak)} MiB"

    @contextmanager
    def around_step(self):
        """run_training's wrapper of every step: measures and reports the second."""
        self.steps_run += 1
        if self.steps_run != 2:
            yield
            return
        with step_peak(self.trainer) as peak:
            yield
        self.trainer.log(self.peak_line(peak.bytes))

    def peak_line(self, measured):
        how = "CUDA max_memory_allocated" if self.trainer.ctx.device.type == "cuda" else "live tensor bytes"
        peak, optimizer = self.predicted["peak"], optimizer_state_bytes(self.trainer.opt)
        return (f"memory in step {self.trainer.step}: peak {_mib(measured)} MiB ({how}), predicted {_mib(peak)} MiB "
                f"({100 * (peak / measured - 1):+.1f}%); optimizer state {_mib(optimizer)} MiB, "
                f"predicted {_mib(self.predicted['optimizer'])} MiB")
