"""ParallelContext: this rank's coordinates and process groups, built from world, rank and Plan.

Ranks are laid out tensor-fastest, then data, then pipeline (as in Megatron):
    rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank
so the ranks that exchange activations every block are neighbours. The context is passed
explicitly to whatever needs it; the few process-wide values (which implementation a group uses,
who listens to collectives) describe the process, not a layout (docs/architecture.md).

The context also owns the rank's device: the model, every buffer, batch, optimizer and RNG
state the engine creates lives on `ctx.device`.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from galaxy.comm.collectives import RecordingGroup
from galaxy.plan import Plan


def _owned(sizes, index):
    start = sum(sizes[:index])
    return range(start, start + sizes[index])


@dataclass
class ParallelContext:
    plan: Plan
    rank: int = 0
    tp_group: object = None   # None means "a group of one": collectives become identities
    dp_group: object = None
    pp_group: object = None   # this rank's pipeline: one rank per stage
    stage_group: object = None  # every rank of this pipeline stage (tensor x data ranks)
    device: torch.device = torch.device("cpu")

    # Where this rank sits in the plan's grid (tensor-fastest, then data, then pipeline).
    world = property(lambda self: self.plan.world)
    tp_size = property(lambda self: self.plan.tp_size)
    tp_rank = property(lambda self: self.rank % self.plan.tp_size)
    dp_rank = property(lambda self: (self.rank // self.plan.tp_size) % self.plan.dp_size)
    pp_rank = property(lambda self: self.rank // (self.plan.tp_size * self.plan.dp_size))
    is_first_stage = property(lambda self: self.pp_rank == 0)
    is_last_stage = property(lambda self: self.pp_rank == self.plan.pp_size - 1)

    # What this rank owns, as ranges into the full model.
    heads = property(lambda self: _owned(self.plan.heads, self.tp_rank))
    kv_heads = property(lambda self: _owned(self.plan.kv_heads, self.tp_rank))
    columns = property(lambda self: _owned(self.plan.columns, self.tp_rank))
    positions = property(lambda self: _owned(self.plan.positions, self.tp_rank))

    def pp_peer(self, stage):
        """Global rank of the same (dp, tp) coordinates at another pipeline stage."""
        return self.rank + (stage - self.pp_rank) * self.plan.tp_size * self.plan.dp_size

    @property
    def layers(self):
        """Every layer this rank holds: its chunks' layers, in model order."""
        return [i for c in range(self.plan.virtual_stages) for i in self.chunk_layers(c)]

    def chunk_layers(self, chunk):
        """The layers of this rank's chunk `chunk`: model stage chunk * pp_size + pp_rank."""
        return _owned(self.plan.stage_layers, chunk * self.plan.pp_size + self.pp_rank)

    @classmethod
    def create(cls, plan, rank, device=None, backend=None):
        """Build every group (all ranks must call new_group for every group, in order).
        The device is `device` if given, else follows the process group's backend (`backend`
        names it when there is no process group, at world 1): see resolve_device."""
        if dist.is_initialized():
            backend = dist.get_backend()
        device = resolve_device(device, backend, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and kernels launched without a device use it
        if plan.world == 1:
            return cls(plan, rank, device=device)
        if not dist.is_initialized():
            raise RuntimeError("ParallelContext.create needs torch.distributed initialised (see galaxy.runtime.launch)")
        tp, dp, pp = plan.tp_size, plan.dp_size, plan.pp_size
        ctx = cls(plan, rank, device=device)
        coords = [(r // (tp * dp), (r // tp) % dp, r % tp) for r in range(plan.world)]
        ctx.tp_group = _groups(coords, rank, tp, lambda c: (c[0], c[1]))
        ctx.dp_group = _groups(coords, rank, dp, lambda c: (c[0], c[2]))
        ctx.pp_group = _groups(coords, rank, pp, lambda c: (c[1], c[2]))
        ctx.stage_group = _groups(coords, rank, tp * dp, lambda c: c[0])
        return ctx

    @classmethod
    def recording(cls, plan, rank):
        """Rank `rank`'s context on the meta device, its groups RecordingGroups: the real model runs
        on it without processes, data or compute, and reports every collective (galaxy.profiler.explain)."""
        ctx = cls(plan, rank, device=torch.device("meta"))
        within_stage = rank % (plan.tp_size * plan.dp_size)
        for name, size, index in (("tp_group", plan.tp_size, ctx.tp_rank), ("dp_group", plan.dp_size, ctx.dp_rank),
                                  ("pp_group", plan.pp_size, ctx.pp_rank),
                                  ("stage_group", plan.tp_size * plan.dp_size, within_stage)):
            setattr(ctx, name, RecordingGroup(size, index) if size > 1 else None)
        return ctx


def local_gpu(rank):
    """The one rule for which GPU of this machine a rank uses: torchrun's LOCAL_RANK, else the rank,
    modulo the GPUs here (galaxy.runtime.launch sets it before NCCL starts; resolve_device names it)."""
    return int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()


def resolve_device(device, backend, rank):
    """`device` if given, else CUDA under NCCL, else the CPU (gloo, or world 1 with no backend named).
    CUDA without an index is this rank's GPU (local_gpu)."""
    device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_gpu(rank))
    return device


def _groups(coords, rank, size, key):
    """Create one group per value of `key` (ranks sharing it); return the one holding `rank`."""
    if size == 1:
        return None
    return new_groups(rank, [[r for r, c in enumerate(coords) if key(c) == value]
                             for value in sorted({key(c) for c in coords})])


def new_groups(rank, members):
    """Create a process group of each list of ranks in `members` (every rank creates every group, in
    the same order); return the one holding `rank`, None if none does."""
    made = [(ranks, dist.new_group(ranks)) for ranks in members]
    return next((group for ranks, group in made if rank in ranks), None)
