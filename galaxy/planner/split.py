"""The planner's decisions as pure functions (no processes): given each rank's measured cost per
head, per intermediate column and per sequence position, the link bandwidth and memory budgets,
choose the Galaxy layout's per-rank splits that minimise the predicted layer latency, and, for a
pipeline, how many layers each stage runs.

Cost model for one Galaxy layer (ATT=TP, CON=SP, MLP=TP), forward:
    max_r(att0_r + heads_r * att_r) + max_r(mlp0_r + cols_r * mlp_r) + 2 * max_r(con0_r + pos_r * con_r)
    + 2 all-gathers + 2 reduce-scatters of the [B, T, H] activation over the link
where the fixed parts (att0, mlp0, con0: a block call's overhead) are 0 unless measured (live
re-planning fits them from two shares, galaxy.planner.replan).
Blocks are separated by collectives, so each block costs its slowest rank: every split is a
min-max problem of its own, solved exactly by `apportion`.

Cost model for a pipeline (`pipeline_seconds`): stage s runs its layers at its tensor group's
planned layer time, the first stage also embeds, and each micro-batch's activation crosses
every link between stages; `plan_stage_layers` minimises the resulting forward latency exactly.
"""
from bisect import bisect_right
from dataclasses import dataclass, fields

from galaxy.comm.overlap import simplest_first
from galaxy.errors import ConfigError
from galaxy.plan import even_split


@dataclass(frozen=True)
class RankProfile:
    att_s_per_head: float     # attention block time per head (full sequence)
    mlp_s_per_column: float   # MLP block time per intermediate column (full sequence)
    con_s_per_position: float  # connective block time per sequence position
    memory_bytes: float = float("inf")  # budget for this rank's layer parameters
    embed_s: float = 0.0      # embeddings of the batch (paid by the first pipeline stage only)
    att_s_fixed: float = 0.0  # a block's time whatever its share (per-call overhead), per block
    mlp_s_fixed: float = 0.0
    con_s_fixed: float = 0.0


def apportion(total, costs, caps=None, unit=1, fixed=None):
    """Integers n_r (multiples of `unit`, >= unit, <= caps[r]) summing to `total` that minimise
    max_r(fixed[r] + n_r * costs[r]) (fixed: 0 when not given). Greedy: each next unit goes where
    it finishes earliest, which is optimal for this separable min-max problem of non-decreasing costs."""
    if total % unit:  # (ConfigError: a world, model or memory budget the split cannot serve)
        raise ConfigError(f"total {total} is not a multiple of unit {unit}")
    caps = caps or [total] * len(costs)
    fixed = fixed or [0.0] * len(costs)
    n = [unit] * len(costs)
    if sum(n) > total or any(c < unit for c in caps):
        raise ConfigError(f"cannot give each of {len(costs)} ranks at least {unit} of {total} within caps {caps}")
    for _ in range((total - sum(n)) // unit):
        open_ = [r for r in range(len(n)) if n[r] + unit <= caps[r]]
        if not open_:
            raise ConfigError(f"memory budgets allow only {sum(n)} of {total} units (caps {caps})")
        best = min(open_, key=lambda r: (fixed[r] + (n[r] + unit) * costs[r], r))
        n[best] += unit
    return n


def _gather_bytes(positions, batch, hidden, bytes_per=4):
    """What each rank sends in an all-gather along the sequence of a [B, T, hidden] activation
    (ring; the longest shard sets it)."""
    return (len(positions) - 1) * batch * max(positions) * hidden * bytes_per


def comm_seconds(positions, batch, hidden, bandwidth_Bps, bytes_per=4):
    """Galaxy's 4 edge collectives per layer (ring volumes; an all-gather lasts as long as the longest shard takes)."""
    p = len(positions)
    if p == 1:
        return 0.0
    full = batch * sum(positions) * hidden * bytes_per
    scatter = (p - 1) / p * full
    return 2 * (_gather_bytes(positions, batch, hidden, bytes_per) + scatter) / bandwidth_Bps


SPLIT_KEYS = ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list")
# per split list: the RankProfile's (seconds per unit, fixed seconds) of the block it splits
_BLOCK_COSTS = {"tp_num_attention_heads_list": ("att_s_per_head", "att_s_fixed"),
                "tp_intermediate_size_list": ("mlp_s_per_column", "mlp_s_fixed"),
                "seq_scatter_list": ("con_s_per_position", "con_s_fixed")}


def predict_layer_seconds(split, profiles, batch, hidden, bandwidth_Bps):
    att, mlp, con = (max(getattr(p, fixed) + n * getattr(p, each) for n, p in zip(split[key], profiles, strict=True))
                     for key, (each, fixed) in _BLOCK_COSTS.items())
    return att + mlp + 2 * con + comm_seconds(split["seq_scatter_list"], batch, hidden, bandwidth_Bps)


def layer_param_bytes(hidden, heads, bytes_per=4):
    """One layer's parameter bytes per attention head (q,k,v rows + o columns) and per
    intermediate column (up row + down column)."""
    d = hidden // heads
    return bytes_per * (4 * hidden * d + 3 * d), bytes_per * (2 * hidden + 1)


def _fit(budget, unit_bytes, most):
    """How many units of unit_bytes fit in budget, at most `most` (all of them when unbounded)."""
    return most if budget == float("inf") else min(most, int(budget // unit_bytes))


def memory_caps(profiles, hidden, heads, intermediate, layers):
    """Per-rank caps on heads and columns: each rank's budget shared between attention and MLP
    parameters in the full model's proportion."""
    per_head, per_col = (layers * b for b in layer_param_bytes(hidden, heads))
    att_share = heads * per_head / (heads * per_head + intermediate * per_col)
    head_caps = [_fit(p.memory_bytes * att_share, per_head, heads) for p in profiles]
    col_caps = [_fit(p.memory_bytes * (1 - att_share), per_col, intermediate) for p in profiles]
    return head_caps, col_caps


def split_layer(profiles, totals, units=None, caps=None, extra=None):
    """The one split policy (the planner, live re-planning, elastic recovery): each SPLIT_KEYS list
    in `totals` (key -> heads, columns or positions to share) apportioned to the ranks' fixed and
    per-unit seconds of its block (plus extra[key] a unit: link time), in multiples of units[key]
    (a GQA group of heads), within caps[key]."""
    units, caps, extra = units or {}, caps or {}, extra or {}
    return {key: apportion(total, [getattr(p, _BLOCK_COSTS[key][0]) + extra.get(key, 0.0) for p in profiles],
                           caps.get(key), units.get(key, 1), [getattr(p, _BLOCK_COSTS[key][1]) for p in profiles])
            for key, total in totals.items()}


def _send_s_per_position(world, batch, hidden, bandwidth_Bps, bytes_per=4):
    """Link seconds per layer that each position a rank owns costs it, per connective: it sends its
    positions to every peer in each all-gather (collectives' direct exchange), so the rank with the
    most positions sets the gathers' time. With the connective's own cost per position, the split
    of positions minimises the slowest rank's connective plus sends (0 on a free link)."""
    return (world - 1) * batch * hidden * bytes_per / bandwidth_Bps


def plan_galaxy(profiles, *, hidden, heads, intermediate, seq, layers, batch, bandwidth_Bps, column_unit=1,
                head_unit=1):
    """The Galaxy config keys (per-rank splits) minimising predicted latency, and that latency (s).
    Heads move in multiples of head_unit (a GQA group), columns of column_unit."""
    units = {SPLIT_KEYS[0]: head_unit, SPLIT_KEYS[1]: column_unit}
    caps = {key: [c - c % units[key] for c in key_caps]  # memory_caps: the heads', then the columns'
            for key, key_caps in zip(SPLIT_KEYS, memory_caps(profiles, hidden, heads, intermediate, layers))}
    totals = dict(zip(SPLIT_KEYS, (heads, intermediate, seq), strict=True))
    send = _send_s_per_position(len(profiles), batch, hidden, bandwidth_Bps)
    split = {"parallel": "galaxy", **split_layer(profiles, totals, units, caps, {SPLIT_KEYS[2]: send})}
    return split, layers * predict_layer_seconds(split, profiles, batch, hidden, bandwidth_Bps)


def even_galaxy(world, *, heads, intermediate, seq):
    """The even split (what a config without lists gets), for comparison."""
    return {"parallel": "galaxy", **{k: even_split(n, world) for k, n in zip(SPLIT_KEYS, (heads, intermediate, seq))}}


def pipeline_seconds(stage_layers, s_per_layer, microbatches, extra_s=None, link_s=0.0):
    """Predicted forward latency of a pipeline of equal micro-batches. Stage s takes
    T_s = stage_layers[s] * s_per_layer[s] + extra_s[s] per micro-batch, each of the S - 1 links
    link_s. Micro-batches pass the stages and links in order, so (a flow shop of identical jobs)
    the last one leaves after the first one's trip plus one bottleneck step per further one:
        sum_s T_s + (S - 1) * link_s + (M - 1) * max(max_s T_s, link_s)
    (GPipe's (M + S - 1) * max_s T_s when all stages are equal; the forward phase of GPipe/1F1B)."""
    extra_s = extra_s or [0.0] * len(s_per_layer)
    times = [n * t + e for n, t, e in zip(stage_layers, s_per_layer, extra_s, strict=True)]
    return sum(times) + (len(times) - 1) * link_s + (microbatches - 1) * max(max(times), link_s)


def _check_stages(layers, s_per_layer, microbatches, extra_s, caps):
    stages = len(s_per_layer)
    if stages < 1 or layers < stages:
        raise ValueError(f"{layers} layers cannot give each of {stages} pipeline stages at least one layer")
    if microbatches < 1:
        raise ValueError(f"num_microbatches {microbatches} must be at least 1")
    if not all(0 < t < float("inf") for t in s_per_layer):
        raise ValueError(f"seconds per layer {s_per_layer} must be positive and finite")
    for name, values in (("extra seconds", extra_s), ("memory caps", caps)):
        if len(values) != stages:
            raise ValueError(f"{name} {values} have {len(values)} entries for {stages} stages")
    if min(caps) < 1 or sum(min(c, layers) for c in caps) < layers:
        raise ValueError(f"memory caps {caps} (layers each stage can hold) do not fit {layers} layers, "
                         f"one or more on each stage")


def _fill_fastest(layers, s_per_layer, room):
    """One layer per stage, then the rest on the fastest stages, each up to its room: the least
    total stage time among splits giving stage s at most room[s] layers."""
    n = [1] * len(s_per_layer)
    left = layers - len(n)
    for s in sorted(range(len(n)), key=lambda s: s_per_layer[s]):
        n[s] += min(room[s] - 1, left)
        left -= n[s] - 1
    return n


def plan_stage_layers(layers, s_per_layer, microbatches, *, extra_s=None, link_s=0.0, caps=None):
    """stage_num_hidden_layers_list (>= 1 layer and <= caps[s] on stage s, summing to `layers`)
    minimising `pipeline_seconds`, and that latency (s).

    Exact: an optimal split has some bottleneck stage time B, one of the values n * t_s + e_s.
    For each such B, `_fill_fastest` within it gives the least sum of stage times with every
    stage <= B, which is at least as good; the best over all B is optimal. With many micro-batches
    only the bottleneck counts (without extra costs: `apportion`'s min-max split); with few, the
    first micro-batch's trip counts too (M = 1 runs the stages one after another, so layers go to
    the fastest stage), which is why this is not `apportion`."""
    extra_s = extra_s or [0.0] * len(s_per_layer)
    caps = caps or [layers] * len(s_per_layer)
    _check_stages(layers, s_per_layer, microbatches, extra_s, caps)
    # each stage's possible times per micro-batch, ascending: room within B is a bisection
    times = [[n * t + e for n in range(1, min(cap, layers) + 1)]
             for t, e, cap in zip(s_per_layer, extra_s, caps, strict=True)]
    rooms = ([bisect_right(ts, bound) for ts in times] for bound in sorted({x for ts in times for x in ts}))
    splits = [_fill_fastest(layers, s_per_layer, room) for room in rooms if min(room) >= 1 and sum(room) >= layers]
    return min(((n, pipeline_seconds(n, s_per_layer, microbatches, extra_s, link_s)) for n in splits),
               key=lambda best: best[1])


def stage_costs(tensor_split, profiles, stages, *, hidden, heads, seq, layers, batch, bandwidth_Bps):
    """What `plan_stage_layers` needs, for `stages` stages of len(profiles) / stages tensor ranks
    (rank order: tensor rank fastest, then stage) that all use tensor_split:
    (seconds per layer, extra seconds, link seconds, layers within memory) per stage.
    A stage's layer costs its planned Galaxy layer (slowest rank per block); the first stage also
    embeds (its slowest rank); the link carries one [batch, seq, hidden] fp32 activation.
    The LM head is not in the encoder forward the planner measures, so the last stage pays nothing extra."""
    tp = len(profiles) // stages
    groups = [profiles[s * tp:(s + 1) * tp] for s in range(stages)]
    per_head, per_col = layer_param_bytes(hidden, heads)
    shares = list(zip(tensor_split["tp_num_attention_heads_list"], tensor_split["tp_intermediate_size_list"],
                      strict=True))
    s_per_layer = [predict_layer_seconds(tensor_split, g, batch, hidden, bandwidth_Bps) for g in groups]
    caps = [min(_fit(p.memory_bytes, h * per_head + c * per_col, layers) for p, (h, c) in zip(g, shares, strict=True))
            for g in groups]
    extra_s = [max(p.embed_s for p in groups[0])] + [0.0] * (stages - 1)
    return s_per_layer, extra_s, batch * seq * hidden * 4 / bandwidth_Bps, caps


def _slowest(profiles):
    """One profile with the worst of each figure (tightest memory)."""
    return RankProfile(*((min if f.name == "memory_bytes" else max)(getattr(p, f.name) for p in profiles)
                         for f in fields(RankProfile)))


def _pipeline_keys(tensor_split, stage_layers, tp):
    """Config keys: the tensor split when stages have several ranks, else plain pipelining."""
    return dict(tensor_split if tp > 1 else {"parallel": "pp"}, stage_num_hidden_layers_list=stage_layers)


def plan_pipeline(profiles, stages, *, hidden, heads, intermediate, seq, layers, batch, microbatches,
                  bandwidth_Bps, column_unit=1):
    """Config keys (tensor splits if a stage has several ranks, stage_num_hidden_layers_list) and
    the predicted forward latency (s); `batch` is the micro-batch size the profiles were taken at.
    The config has one tensor split for all stages: it is planned for each tensor position's slowest
    rank over the stages (a heuristic: the stage with the slowest ranks tends to be the bottleneck),
    with memory caps as if each stage held its even share of layers; the stage layers then follow
    exactly from the stages' resulting layer times and memory."""
    tp = len(profiles) // stages
    if tp > 1:
        worst = [_slowest(profiles[i::tp]) for i in range(tp)]
        tensor = plan_galaxy(worst, hidden=hidden, heads=heads, intermediate=intermediate, seq=seq,
                             layers=-(-layers // stages), batch=batch, bandwidth_Bps=bandwidth_Bps,
                             column_unit=column_unit)[0]
    else:  # one rank per stage runs whole layers; its memory only limits its layer count
        tensor = even_galaxy(1, heads=heads, intermediate=intermediate, seq=seq)
    s_per_layer, extra_s, link_s, caps = stage_costs(tensor, profiles, stages, hidden=hidden, heads=heads, seq=seq,
                                                     layers=layers, batch=batch, bandwidth_Bps=bandwidth_Bps)
    n, predicted = plan_stage_layers(layers, s_per_layer, microbatches, extra_s=extra_s, link_s=link_s, caps=caps)
    return _pipeline_keys(tensor, n, tp), predicted


def even_pipeline(profiles, stages, *, hidden, heads, intermediate, seq, layers, batch, microbatches, bandwidth_Bps):
    """The even tensor split and even stage layers, with their predicted latency, for comparison."""
    tp = len(profiles) // stages
    tensor = even_galaxy(tp, heads=heads, intermediate=intermediate, seq=seq)
    s_per_layer, extra_s, link_s, _ = stage_costs(tensor, profiles, stages, hidden=hidden, heads=heads, seq=seq,
                                                  layers=layers, batch=batch, bandwidth_Bps=bandwidth_Bps)
    n = even_split(layers, stages)
    return _pipeline_keys(tensor, n, tp), pipeline_seconds(n, s_per_layer, microbatches, extra_s, link_s)


def tiled_variants(split, tiles):
    """The planned split once per overlap_tiles candidate. Whether tiles pay depends on how the link
    and the CPUs share the work (docs/measurements.md), so the candidates are measured, not predicted."""
    if list(tiles) == [1]:
        return {"planned": split}
    return {f"planned, {k} tile(s)": dict(split, overlap_tiles=k) for k in tiles}


def _per_position_seconds(p, heads, intermediate, seq):
    """One position's share of a whole layer on this rank: attention (its queries against every
    key) and MLP of all heads and columns, plus both connectives."""
    return (heads * p.att_s_per_head + intermediate * p.mlp_s_per_column) / seq + 2 * p.con_s_per_position


def _gather_seconds(positions, batch, hidden, bandwidth_Bps, bytes_per=4):
    return _gather_bytes(positions, batch, hidden, bytes_per) / bandwidth_Bps


def tp_layer_seconds(profiles, *, hidden, heads, intermediate, seq, batch, bandwidth_Bps):
    """Predicted forward time of one layer in even TP (Megatron): heads and columns split evenly,
    every rank runs both connectives over all positions, and two all-reduces of the [B, T, H]
    activation (ring: 2 (p - 1) / p of it sent per rank each)."""
    p = len(profiles)
    # Galaxy's blocks with every rank's connectives over all positions, and no gathers or scatters
    split = dict(even_galaxy(p, heads=heads, intermediate=intermediate, seq=seq), seq_scatter_list=[seq] * p)
    all_reduce = 2 * (p - 1) / p * batch * seq * hidden * 4 / bandwidth_Bps
    return predict_layer_seconds(split, profiles, batch, hidden, float("inf")) + 2 * all_reduce


def plan_layouts(profiles, *, hidden, heads, intermediate, seq, layers, batch, bandwidth_Bps, column_unit=1):
    """The planner's candidates for a forward pass, name -> (config keys, predicted seconds), simplest
    first: "local" (the fastest rank alone; it is rank `keys["rank"]`), "tp" (even TP), "sp" (sequence
    parallelism, positions apportioned to speed; per layer K and V are all-gathered), "galaxy even"
    (`even_galaxy`) and "galaxy" (`plan_galaxy`). The even splits are there because a plan is only as
    good as its profile: the check (galaxy.planner.check) races them all. All count the embeddings
    (every rank embeds the whole batch) and, sequence-split ones, the final gather of the output, so
    their times compare; choose with `min(candidates, key=lambda k: candidates[k][1])`."""
    dims = dict(heads=heads, intermediate=intermediate, seq=seq)
    embed = max(p.embed_s for p in profiles)
    per_position = [_per_position_seconds(p, **dims) for p in profiles]
    local = [layers * seq * t + p.embed_s for t, p in zip(per_position, profiles, strict=True)]
    fastest = min(range(len(profiles)), key=local.__getitem__)
    positions = apportion(seq, per_position)
    out_gather = _gather_seconds(positions, batch, hidden, bandwidth_Bps)
    sp_layer = max(n * t for n, t in zip(positions, per_position, strict=True)) + 2 * out_gather  # K and V
    tp_layer = tp_layer_seconds(profiles, hidden=hidden, batch=batch, bandwidth_Bps=bandwidth_Bps, **dims)
    galaxy, galaxy_s = plan_galaxy(profiles, hidden=hidden, intermediate=intermediate, layers=layers, batch=batch,
                                   bandwidth_Bps=bandwidth_Bps, column_unit=column_unit, heads=heads, seq=seq)
    even = even_galaxy(len(profiles), **dims)
    even_s = layers * predict_layer_seconds(even, profiles, batch, hidden, bandwidth_Bps)

    def with_gather(split, seconds):  # the embeddings before, the output gathered along the sequence after
        return split, seconds + embed + _gather_seconds(split["seq_scatter_list"], batch, hidden, bandwidth_Bps)
    return {"local": ({"parallel": "serial", "rank": fastest}, local[fastest]),
            "tp": ({"parallel": "tp"}, layers * tp_layer + embed),
            "sp": ({"parallel": "sp", "seq_scatter_list": positions}, layers * sp_layer + embed + out_gather),
            "galaxy even": with_gather(even, even_s),
            "galaxy": with_gather(galaxy, galaxy_s)}


def race(candidates, tiles):
    """What the check races, simplest first, name -> config keys: plan_layouts' candidates (local
    without its "rank": the caller runs it on the fastest rank), the planned Galaxy split once per
    overlap_tiles of `tiles` ("galaxy x2": 2 tiles, "galaxy x[1, 3]": 2 tiles sized 1:3)."""
    out = {name: {k: v for k, v in keys.items() if k != "rank"} for name, (keys, _) in candidates.items()
           if name != "galaxy"}
    out.update({f"galaxy x{k}": dict(candidates["galaxy"][0], overlap_tiles=k) for k in simplest_first(tiles)})
    return out
