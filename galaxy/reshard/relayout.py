"""A running model moved to another plan in memory, without a restart.

Two callers: live re-planning (galaxy.planner.replan: the same ranks, another split) and --elastic
inference (galaxy.runtime.elastic: fewer ranks once one has died). Both build this rank's model under
the new plan on the meta device and give it memory (`build_empty`: no initial weights drawn), then
`fill` it: each rank keeps its own rows, and receives the rows that change owner point to point
(galaxy.comm.rows); AdamW's moments move like their parameters. After a loss, the rows that only
a lost rank held are rebuilt by one survivor from the run's sources (`build_lost_part`: the seed's
weights, then load_checkpoint's and load_trainable's slices of those rows only) and sent on the same way.
"""
from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from galaxy.comm.context import ParallelContext
from galaxy.layers.param_spec import spec_of, span, split_dim
from galaxy.layers.transformer import TransformerLayer
from galaxy.models.common import init_weights
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.comm.rows import send_rows, share_rows
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


def build_lost_part(cfg, plan, lost_rank, like, device):
    """The split parameters rank `lost_rank` held under `plan`, rebuilt here from the run's sources
    as that rank built them (the seed's weights, then galaxy.tuning.apply.load_sources, which
    reads only these parameters' slices of the files); its replicated parameters and buffers stay
    on the meta device: every survivor holds them. Returns (model in `like`'s dtype and mode, bytes rebuilt)."""
    ctx = ParallelContext(plan, rank=lost_rank, device=META)
    with _NoDrawOnMeta():
        model = build_model(cfg, ctx)
    ctx.device = device
    _give_memory(model, device, lambda name, t: isinstance(t, nn.Parameter) and part_of(t) is not None)
    init_weights(model, cfg["initializer_range"], cfg["seed"])  # skips what stays on meta
    load_sources(model, cfg, ctx, verified=True)  # the tuning method's parameters are made here, with memory
    rebuilt = sum(p.numel() * p.element_size() for p in model.parameters() if part_of(p) and not p.is_meta)
    return model.to(next(like.parameters()).dtype).train(like.training), rebuilt


def part_of(p):
    """p's Shard when p holds only part of its full tensor, else None (a sequence-parallel layer's
    weights carry a Shard of all rows on every rank: every survivor holds them)."""
    shard = spec_of(p).shard
    return shard if shard is not None and shard.length < shard.full else None


class Holding:
    """This rank's model, its context (hence the plan), the config that planned it and the optimizer
    over it (None when serving): what a move swaps together (`move`, `build_like`, then `adopt`).
    An inference Server is one; a Trainer has the same four and its own `adopt` (galaxy.train does
    not import reshard)."""

    def __init__(self, model, ctx, cfg, opt=None):
        self.model, self.ctx, self.cfg, self.opt = model, ctx, cfg, opt

    def adopt(self, model, ctx, cfg):
        """Go on with `model`, filled under ctx's plan."""
        self.model, self.ctx, self.cfg = model, ctx, cfg


def build_like(holding, cfg, ctx):
    """`build_empty` in the holding's dtype and mode (a LoRA layer merges on eval: the rows it receives are)."""
    model, ctx = build_empty(cfg, ctx)
    return model.to(next(holding.model.parameters()).dtype).train(holding.model.training), ctx


def move(holding, cfg):
    """Live re-planning: `holding` (a Holding, a Trainer) to cfg's plan on the same ranks (collective
    over the tensor group)."""
    model, ctx = build_like(holding, cfg, holding.ctx)
    fill(model, [holding.model], ctx, holding.opt)
    holding.adopt(model, ctx, cfg)


@torch.no_grad()
def fill(new, holders, ctx, opt=None):
    """Fill `new` (this rank's model under ctx's plan) round by round over ctx's tensor group.
    holders[0] is this rank's model under the old plan; holders[k] for k >= 1 the k-th lost rank's
    `build_lost_part` on the survivor standing in for it (None on the others). What stays in place
    (a replicated parameter, one split alike, buffers) is handed over, not copied: holders[0] must
    not be used again. `opt` (built for holders[0]) is pointed at new's parameters, AdamW's moments
    moved like them. Returns this rank's {kept, received} bytes (its own memory / from peers)."""
    params, rank, kept, received = list(new.named_parameters()), ctx.tp_rank, 0, 0
    dims = [split_dim(q) for _, q in params]
    for k, holder in enumerate(holders):
        # a lost rank's part brings its split rows only: every survivor holds its whole tensors
        got = {name: p for name, p in holder.named_parameters() if k == 0 or part_of(p)} if holder is not None else {}
        # the rows the holder has of each parameter (none if absent or on meta) and the rows new needs
        layouts = share_rows(ctx, dims, [(span(got.get(name), dim), span(q, dim))
                                         for (name, q), dim in zip(params, dims, strict=True)])
        if k == 0:
            moved, filled = layouts, [0] * len(params)
        for i, ((name, q), rows) in enumerate(zip(params, layouts, strict=True)):
            if rows.in_place:
                if k == 0:
                    q.data, kept, filled[i] = got[name].data, kept + q.numel() * q.element_size(), _count(rows, rank)
                continue
            own, came = send_rows(q.data, got.get(name), rows, rank, ctx.tp_group)
            row_bytes = q.numel() * q.element_size() // max(1, q.shape[rows.dim])
            kept, received, filled[i] = kept + own * row_bytes, received + came * row_bytes, filled[i] + own + came
    missing = [name for (name, _), rows, got in zip(params, moved, filled, strict=True) if got != _count(rows, rank)]
    if missing:
        raise RuntimeError(f"after the loss, parts of {missing[:3]} ({len(missing)} tensors) were on no survivor "
                           f"and not rebuilt from the sources")
    buffers = dict(holders[0].named_buffers())
    for name, b in new.named_buffers():
        b.data = buffers[name].data
    if opt is not None:
        _move_optimizer(opt, dict(holders[0].named_parameters()), params, moved, ctx)
    return {"kept": kept, "received": received}


def _count(rows, rank):
    return rows.wanted[rank][1] - rows.wanted[rank][0]


def _move_optimizer(opt, old, params, layouts, ctx):
    """Point `opt` from the `old` parameters (by name) at the new `params`; a tensor of its
    parameter's shape (AdamW's moments) moves as the parameter's rows did (`layouts`)."""
    def moved(tensor, rows, like):
        if not rows.in_place:
            tensor, held = tensor.new_empty(like.shape), tensor
            send_rows(tensor, held, rows, ctx.tp_rank, ctx.tp_group)
        return tensor

    pairs = [(old[name], q) for name, q in params]
    opt.state = defaultdict(dict, {q: {k: moved(v, rows, q) if torch.is_tensor(v) and v.shape == p.shape else v
                                       for k, v in opt.state[p].items()}
                                   for (p, q), rows in zip(pairs, layouts, strict=True) if p in opt.state})
    new_of = {p: q for p, q in pairs}
    for group in opt.param_groups:
        group["params"] = [new_of[p] for p in group["params"]]
