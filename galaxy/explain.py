"""What a plan does, computed before any process starts (pretrain_galaxy.py --explain).

For every rank: which heads, KV heads, intermediate columns, sequence positions and layers it
owns, and every collective of one optimizer step with the shape and bytes of the tensor this
rank contributes (all-gather: its own slice; reduce-scatter and all-reduce: its whole input).
The collectives come from the placement TABLE that `redistribute` runs and from CONJUGATES in
galaxy.comm.collectives, so the printed plan and the executed one share their source; the
observe tests check the byte totals against a traced run.

The boundaries walked per layer are those of TransformerLayer.forward, in its order. Under
pipeline parallelism a stage's point-to-point sends are listed too: every stream the model hands on
(the hidden states; side-tuning adds the side state) forward, and those that carry a gradient back.
Side-tuning also gathers every layer's output for the side network, and runs no backward collective
in the frozen backbone.
"""
import math
from collections import Counter
from dataclasses import dataclass

from galaxy.comm.collectives import CONJUGATES
from galaxy.comm.context import ParallelContext
from galaxy.comm.stats import BWD, FWD, GRAD, label
from galaxy.layers.placement import PRODUCES, REPLICATE, TABLE, consumes
from galaxy.pipeline.engine import pipeline_streams
from galaxy.pipeline.schedule import format_actions, schedule_actions
from galaxy.plan import Method
from galaxy.train.grad_sync import grad_groups

BYTES_PER_ELEMENT = 4  # fp32 activations and gradients (bf16 autocast would change some, not all)


@dataclass
class Move:
    layer: int        # global layer index, None outside layers
    where: str        # e.g. "ATT out -> CON1"
    op: str           # the galaxy.comm.collectives function ("buckets" for gradient sync)
    phase: str        # fwd | bwd | grad
    kind: str         # all_gather | reduce_scatter | all_reduce | send
    shape: tuple      # the tensor this rank contributes
    times: int = 1    # per optimizer step (micro-batches)

    @property
    def nbytes(self):
        return BYTES_PER_ELEMENT * math.prod(self.shape) * self.times


def layer_boundaries(plan, input_placement):
    """(label, placement of the tensor, method of the block that consumes it), as in TransformerLayer."""
    rest = consumes(plan.con)
    return [("ATT in", input_placement, plan.att),
            ("ATT out -> CON1", PRODUCES[plan.att], plan.con),
            ("residual -> CON1", input_placement, plan.con),
            ("MLP in", rest, plan.mlp),
            ("MLP out -> CON2", PRODUCES[plan.mlp], plan.con)]


def _op_moves(layer, where, op, full, local, times):
    """The communicating halves (forward, backward) of one autograd collective."""
    return [Move(layer, where, op, phase, kind, local if kind == "all_gather" else full, times)
            for phase, kind in zip((FWD, BWD), CONJUGATES[op]) if kind is not None]


def _table_moves(layer, where, src, method, full, local, times):
    """The collectives the placement table puts at one block boundary."""
    return [m for op in TABLE[src, method] for m in _op_moves(layer, where, op.__name__, full, local, times)]


def activation_moves(plan, cfg, rank):
    """Every activation collective of one optimizer step on `rank`."""
    ctx = ParallelContext(plan, rank)
    b = cfg["batch_size"] // plan.dp_size
    times = cfg["gradient_accumulation_steps"]
    T, H, t = cfg["seq_length"], cfg["hidden_size"], len(ctx.positions)
    full, local = (b, T, H), (b, t, H)
    kv, d = cfg.get("num_key_value_heads") or cfg["num_attention_heads"], H // cfg["num_attention_heads"]
    side = cfg.get("use_side") or cfg.get("use_side_only")
    moves, placement = [], REPLICATE
    for layer in ctx.layers:
        for where, src, method in layer_boundaries(plan, placement):
            moves += _table_moves(layer, where, src, method, full, local, times)
        if plan.att is Method.SP:  # SP attention gathers every position's keys and values (Attention.forward)
            for name in ("K", "V"):
                moves += _op_moves(layer, f"ATT {name}", "all_gather", (b, kv, T, d), (b, kv, t, d), times)
        placement = consumes(plan.con)
        if side:  # the side network reads each layer's output replicated
            moves += _table_moves(layer, "layer out -> side", placement, Method.NONE, full, local, times)
    moves += _table_moves(None, "encoder out", placement, Method.NONE, full, local, times)
    # side-tuning reads the frozen backbone detached: no gradient, so no backward collective, flows through it
    return [m for m in moves if m.phase == FWD] if side else moves


def grad_moves(model, ctx):
    """Gradient all-reduces of one step: parameters summed over the stage, then over replicas."""
    moves = []
    for name, params, _, size in grad_groups(model, ctx):
        n = sum(p.numel() for p in params)
        if size > 1 and n:
            moves.append(Move(None, f"gradient sync over the {name} group ({size} ranks)", "buckets", GRAD,
                              "all_reduce", (n,)))
    return moves


def p2p_moves(cfg, ctx, streams):
    """A pipeline stage's sends of one step (galaxy.pipeline.engine): each stream's micro-batches
    to the next stage, and the gradients of the streams that carry one back to the previous."""
    plan, moves = ctx.plan, []
    micro = cfg["batch_size"] // plan.dp_size // cfg["num_microbatches"]
    times = cfg["gradient_accumulation_steps"] * cfg["num_microbatches"]
    for width, carries_grad in streams:
        shape = (micro, cfg["seq_length"], width)
        if not ctx.is_last_stage:
            moves.append(Move(None, f"to stage {ctx.pp_rank + 1}, width {width}", "StageLinks", FWD, "send", shape, times))
        if not ctx.is_first_stage and carries_grad:
            moves.append(Move(None, f"to stage {ctx.pp_rank - 1}, width {width}", "StageLinks", BWD, "send", shape, times))
    return moves


def step_moves(plan, cfg, rank, build_model=None):
    """Activation collectives and pipeline sends, plus gradient sync when `build_model(ctx)` can
    build the rank's model (which also says what streams a pipeline stage hands on)."""
    ctx = ParallelContext(plan, rank)
    model = build_model(ctx) if build_model is not None else None
    moves = activation_moves(plan, cfg, rank)
    if plan.pp_size > 1:
        moves += p2p_moves(cfg, ctx, pipeline_streams(model, cfg["hidden_size"]))
    if model is not None:
        moves += grad_moves(model, ctx)
    return moves


def bytes_by_label(moves):
    """{"all_gather": n, "reduce_scatter(bwd)": n, ...}: the names traces use."""
    out = Counter()
    for m in moves:
        out[label(m.kind, m.phase)] += m.nbytes
    return dict(out)


# ----------------------------------------------------------------------------- text

def _span(r):
    """'0-1,3-5': runs of consecutive indices (a pipeline rank's chunks of layers lie apart)."""
    starts = [i for i in r if i - 1 not in r]
    return ",".join(f"{i}-{next(j for j in r if j >= i and j + 1 not in r)}" for i in starts) or "-"


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def ownership(plan):
    """Which slice of each split dimension every rank owns ("all" where it is not split)."""
    split = {"heads": plan.att is Method.TP, "kv_heads": plan.att is Method.TP, "columns": plan.mlp is Method.TP,
             "positions": plan.seq_sharded, "layers": True}
    lines = [f"{'rank':>4} {'tp':>3} {'dp':>3} {'pp':>3} " + " ".join(f"{k:>10}" for k in split)]
    for rank in range(plan.world):
        c = ParallelContext(plan, rank)
        cells = [_span(getattr(c, k)) if is_split else "all" for k, is_split in split.items()]
        lines.append(f"{rank:>4} {c.tp_rank:>3} {c.dp_rank:>3} {c.pp_rank:>3} " + " ".join(f"{v:>10}" for v in cells))
    return lines


def _sections(moves):
    """[(title, rows)]: one section per layer (consecutive layers with equal rows folded) and
    one per other place (encoder end, gradient sync)."""
    sections = []
    for m in moves:
        title = f"layer {m.layer}" if m.layer is not None else m.where
        row = (m.where if m.layer is not None else "", m.op, m.phase, m.kind, m.shape, m.nbytes)
        if sections and sections[-1][0] == [title]:
            sections[-1][1].append(row)
        else:
            sections.append(([title], [row]))
    folded = []
    for titles, rows in sections:
        if folded and folded[-1][1] == rows and titles[0].startswith("layer"):
            folded[-1][0].append(titles[0])
        else:
            folded.append((titles, rows))
    return [(t[0] if len(t) == 1 else f"{t[0]} .. {t[-1].split()[-1]} (each)", rows) for t, rows in folded]


def _move_lines(moves):
    lines = []
    for title, rows in _sections(moves):
        lines.append(f"  {title}")
        for where, op, phase, kind, shape, nbytes in rows:
            lines.append(f"    {where:<18} {op:<17} {phase:<4} {kind:<15} {str(list(shape)):<20} {_mib(nbytes):>11}")
    return lines


def explain(plan, cfg, build_model=None):
    """The plan as text: ownership, per-rank collectives of one step, byte totals."""
    lines = [f"plan for world {plan.world}: {plan.describe()}",
             f"batch {cfg['batch_size']} x seq {cfg['seq_length']} x hidden {cfg['hidden_size']}, fp32, "
             f"{cfg['gradient_accumulation_steps']} micro-step(s) per optimizer step", "", "ownership:"]
    lines += ownership(plan)
    totals = {}
    for rank in range(plan.world):
        moves = step_moves(plan, cfg, rank, build_model)
        totals[rank] = bytes_by_label(moves)
        lines += ["", f"rank {rank}: collectives and pipeline sends of one optimizer step (bytes this rank contributes)"]
        lines += _move_lines(moves) if moves else ["  none"]
    kinds = sorted({k for t in totals.values() for k in t})
    lines += ["", "bytes per optimizer step, per rank:",
              f"{'rank':>4} " + " ".join(f"{k:>20}" for k in kinds) + f" {'total':>12}"]
    for rank, t in totals.items():
        lines.append(f"{rank:>4} " + " ".join(f"{_mib(t.get(k, 0)):>20}" for k in kinds)
                     + f" {_mib(sum(t.values())):>12}")
    if plan.pp_size > 1:
        lines += [""] + _pipeline_lines(plan, cfg)
    return "\n".join(lines)


def _pipeline_lines(plan, cfg):
    """Each stage's schedule as its action list (its sends are in the per-rank tables above)."""
    m = cfg["gradient_accumulation_steps"] * cfg["num_microbatches"]
    lines = [f"pipeline schedule {cfg['pipeline_schedule']}, {m} micro-batches per optimizer step:"]
    for stage in range(plan.pp_size):
        lines.append(f"  stage {stage}: {format_actions(schedule_actions(cfg['pipeline_schedule'], plan.pp_size, stage, m, plan.virtual_stages))}")
    return lines
