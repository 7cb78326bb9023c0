"""A running model moved to another plan in memory, without a restart.

Two callers: live re-planning (galaxy.planner.replan: the same ranks, another split) and --elastic
inference (galaxy.runtime.elastic: fewer ranks once one has died). Both build this rank's model under
the new plan on the meta device and give it memory (`build_empty`: no initial weights drawn), then
fill it:

    move_state        every split parameter sends only the rows that change owner, point to point
                      (collectives.reshard_into); replicated ones are handed over; AdamW's moments move
                      like their parameters
    fill_after_loss   the survivors' own rows stay, or move point to point as above; the rows that
                      only a lost rank held are rebuilt by one survivor from the run's sources
                      (`build_lost_part`: the seed's weights, then load_checkpoint's and load_trainable's
                      slices of those rows only) and sent on the same way
"""
from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from galaxy.comm import collectives as C
from galaxy.comm.context import ParallelContext
from galaxy.layers.param_spec import spec_of
from galaxy.layers.transformer import TransformerLayer
from galaxy.models.common import init_weights
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.tuning.apply import apply_tuning, load_sources

META = torch.device("meta")


class _NoDrawOnMeta(TorchFunctionMode):
    """nn.Embedding draws its default weights with normal_, whose meta-device kernel imports torch's
    decompositions on its first call (seconds); a meta tensor has nothing to draw, so it is skipped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "normal_":  # Tensor.normal_ or nn.init.normal_
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _empty_like(t, device):
    empty = torch.empty(t.shape, dtype=t.dtype, device=device)  # (empty_like of a meta tensor imports sympy)
    if not isinstance(t, nn.Parameter):
        return empty
    p = nn.Parameter(empty, requires_grad=t.requires_grad)
    p.__dict__.update(t.__dict__)  # its ParamSpec
    return p


def _give_memory(model, device, wanted=lambda name, t: True):
    """Memory on `device` for the meta tensors `wanted` picks (unfilled), keeping ParamSpecs and ties."""
    made = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in [(name, t) for name, t in tensors.items() if t is not None and wanted(name, t)]:
                if id(t) not in made:  # a tied parameter gets memory once, and stays tied
                    made[id(t)] = _empty_like(t, device)
                tensors[name] = made[id(t)]


def build_empty(cfg, ctx):
    """This rank's model under cfg's plan, its memory on ctx's device left unfilled (the move fills
    every tensor): built on the meta device, so no initial weights are drawn, then each parameter
    and buffer gets memory, parameters keeping their ParamSpecs and ties. Returns (model, its ctx)."""
    device, ctx = ctx.device, replace(ctx, plan=build_plan(cfg, ctx.world), device=META)
    with _NoDrawOnMeta():
        model = build_model(cfg, ctx)
        apply_tuning(model, cfg, ctx)
    ctx.device = device  # the modules hold this context: from here on they run on the device
    _give_memory(model, device)
    for layer in (m for m in model.modules() if isinstance(m, TransformerLayer)):
        with torch.device(device):
            layer.set_tiles(cfg["overlap_tiles"])
    return model, ctx


def build_lost_part(cfg, plan, lost_rank, device):
    """The split parameters rank `lost_rank` held under `plan`, rebuilt here from the run's sources
    as that rank built them (the seed's weights, then galaxy.tuning.apply.load_sources, which
    reads only these parameters' slices of the files); its replicated parameters and buffers stay
    on the meta device: every survivor holds them. Returns (model, bytes rebuilt)."""
    ctx = ParallelContext(plan, rank=lost_rank, device=META)
    with _NoDrawOnMeta():
        model = build_model(cfg, ctx)
    ctx.device = device
    _give_memory(model, device, lambda name, t: isinstance(t, nn.Parameter) and part_of(t) is not None)
    init_weights(model, cfg["initializer_range"], cfg["seed"])  # skips what stays on meta
    load_sources(model, cfg, ctx, verified=True)  # the tuning method's parameters are made here, with memory
    rebuilt = sum(p.numel() * p.element_size() for p in model.parameters() if part_of(p) and not p.is_meta)
    return model, rebuilt


def part_of(p):
    """p's Shard when p holds only part of its full tensor, else None (a sequence-parallel layer's
    weights carry a Shard of all rows on every rank: every survivor holds them)."""
    shard = spec_of(p).shard
    return shard if shard is not None and shard.length < shard.full else None


@torch.no_grad()
def move_state(old, new, ctx, opt=None):
    """Fill `new` (the model under another plan on the same ranks) from `old`, and point `opt`
    (built for old) at new's parameters with their state moved alike. Collective over the tensor
    group; every rank moves the same tensors in the same (model) order. What does not move (a
    replicated parameter, a buffer such as LLaMA's rotary frequencies) is handed over, not copied:
    `old` is left sharing it and must not be used again."""
    params = dict(new.named_parameters())
    pairs = [(p, params[name]) for name, p in old.named_parameters()]
    layouts = _row_layouts(pairs, ctx, first=True)

    def moved(tensor, i):
        dim, held, wanted = layouts[i]
        if dim < 0 or held == wanted:  # replicated, or split alike: handed over
            return tensor
        lo, hi = wanted[ctx.tp_rank]
        out = tensor.new_empty(tensor.shape[:dim] + (hi - lo,) + tensor.shape[dim + 1:])
        C.reshard_into(out, tensor, dim, held, wanted, ctx.tp_group)
        return out

    for i, (p, q) in enumerate(pairs):
        q.data = moved(p, i).data
    _hand_over_buffers(old, new)
    if opt is None:
        return
    state = {}
    for i, (p, q) in enumerate(pairs):  # a tensor of its parameter's shape (AdamW's moments) moves with it
        if p in opt.state:
            state[q] = {k: moved(v, i) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in opt.state[p].items()}
    opt.state = defaultdict(dict, state)
    new_of = {p: q for p, q in pairs}
    for group in opt.param_groups:
        group["params"] = [new_of[p] for p in group["params"]]


def _hand_over_buffers(old, new):
    buffers = dict(old.named_buffers())
    for name, b in new.named_buffers():
        b.data = buffers[name].data


def _rows(p, q, first, rank):
    """(dim, held lo, held hi, wanted lo, wanted hi) of one parameter on this rank: the rows along
    its split dimension that holder `p` has (none if p is absent or on meta) and that new `q` needs.
    dim -1: split in neither plan. A replicated holder serves its rows from group rank 0 only, in
    the first round (everyone holds them); a split one serves its own shard."""
    old, new = (part_of(p) if p is not None else None), part_of(q)
    dim = (new or old).dim if (new or old) else -1
    wanted = (new.start, new.start + new.length) if new else (0, q.shape[dim] if dim >= 0 else 0)
    if p is None or p.is_meta or dim < 0:
        held = (0, 0)
    elif old:
        held = (old.start, old.start + old.length)
    else:
        held = (0, p.shape[dim]) if first and rank == 0 else (0, 0)
    return (dim, *held, *wanted)


def _row_layouts(pairs, ctx, first):
    """Per (holder, new parameter): (dim, held, wanted), the `_rows` of every rank of the tensor
    group (one small all-gather), so that every rank moves the same tensors the same way."""
    mine = torch.tensor([_rows(p, q, first, ctx.tp_rank) for p, q in pairs], dtype=torch.long, device=ctx.device)
    every = C.gather_along_dim(mine.unsqueeze(0), 0, [1] * ctx.tp_size, ctx.tp_group).tolist()
    return [(every[ctx.tp_rank][i][0], [tuple(r[i][1:3]) for r in every], [tuple(r[i][3:5]) for r in every])
            for i in range(len(pairs))]


@torch.no_grad()
def fill_after_loss(new, holders, ctx):
    """Fill `new` (this rank's model under the survivors' plan, `ctx`) round by round over the
    survivors' tensor group. holders[0] is this rank's model under the old plan; holders[k] for
    k >= 1 is the k-th lost rank's `build_lost_part` on the one survivor standing in for it (None
    on the others). Held rows never overlap within a round: the old ranks' shards are disjoint.
    Returns this rank's {kept, received} bytes (from its own memory / from peers)."""
    params = list(new.named_parameters())
    rank, kept, received = ctx.tp_rank, 0, 0
    filled, needed = [0] * len(params), [1] * len(params)
    for k, holder in enumerate(holders):
        got = dict(holder.named_parameters()) if holder is not None else {}
        layouts = _row_layouts([(got.get(name), q) for name, q in params], ctx, first=k == 0)
        for i, (name, q) in enumerate(params):
            dim, held, wanted = layouts[i]
            if dim < 0:  # replicated before and after: this rank's own copy
                if k == 0:
                    q.data.copy_(got[name])
                    kept, filled[i] = kept + q.numel() * q.element_size(), 1
                continue
            own = max(0, min(held[rank][1], wanted[rank][1]) - max(held[rank][0], wanted[rank][0]))
            rows = C.reshard_into(q.data, got.get(name), dim, held, wanted, ctx.tp_group)
            row_bytes = q.numel() * q.element_size() // max(1, q.shape[dim])
            kept, received = kept + own * row_bytes, received + (rows - own) * row_bytes
            filled[i], needed[i] = filled[i] + rows, wanted[rank][1] - wanted[rank][0]
    missing = [name for (name, _), got, need in zip(params, filled, needed, strict=True) if got != need]
    if missing:
        raise RuntimeError(f"after the loss, parts of {missing[:3]} ({len(missing)} tensors) were on no survivor "
                           f"and not rebuilt from the sources")
    _hand_over_buffers(holders[0], new)
    return {"kept": kept, "received": received}
