"""The planner's decisions as pure functions (no processes): given each rank's measured cost per
head, per intermediate column and per sequence position, the link bandwidth and memory budgets,
choose the Galaxy layout's per-rank splits that minimise the predicted layer latency.

Cost model for one Galaxy layer (ATT=TP, CON=SP, MLP=TP), forward:
    max_r(heads_r * att_r) + max_r(cols_r * mlp_r) + 2 * max_r(pos_r * con_r)
    + 2 all-gathers + 2 reduce-scatters of the [B, T, H] activation over the link
Blocks are separated by collectives, so each block costs its slowest rank: every split is a
min-max problem of its own, solved exactly by `apportion`.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class RankProfile:
    att_s_per_head: float     # attention block time per head (full sequence)
    mlp_s_per_column: float   # MLP block time per intermediate column (full sequence)
    con_s_per_position: float  # connective block time per sequence position
    memory_bytes: float = float("inf")  # budget for this rank's layer parameters


def apportion(total, costs, caps=None, unit=1):
    """Integers n_r (multiples of `unit`, >= unit, <= caps[r]) summing to `total` that minimise
    max_r(n_r * costs[r]). Greedy: each next unit goes where it finishes earliest, which is
    optimal for this separable min-max problem."""
    if total % unit:
        raise ValueError(f"total {total} is not a multiple of unit {unit}")
    caps = caps or [total] * len(costs)
    n = [unit] * len(costs)
    if sum(n) > total or any(c < unit for c in caps):
        raise ValueError(f"cannot give each of {len(costs)} ranks at least {unit} of {total} within caps {caps}")
    for _ in range((total - sum(n)) // unit):
        open_ = [r for r in range(len(n)) if n[r] + unit <= caps[r]]
        if not open_:
            raise ValueError(f"memory budgets allow only {sum(n)} of {total} units (caps {caps})")
        best = min(open_, key=lambda r: ((n[r] + unit) * costs[r], r))
        n[best] += unit
    return n


def comm_seconds(positions, batch, hidden, bandwidth_Bps, bytes_per=4):
    """Galaxy's 4 edge collectives per layer (ring volumes; the all-gather pads to the longest shard)."""
    p = len(positions)
    if p == 1:
        return 0.0
    full = batch * sum(positions) * hidden * bytes_per
    gather = (p - 1) * batch * max(positions) * hidden * bytes_per
    scatter = (p - 1) / p * full
    return 2 * (gather + scatter) / bandwidth_Bps


def predict_layer_seconds(split, profiles, batch, hidden, bandwidth_Bps):
    heads, cols, pos = split["tp_num_attention_heads_list"], split["tp_intermediate_size_list"], split["seq_scatter_list"]
    att = max(h * p.att_s_per_head for h, p in zip(heads, profiles))
    mlp = max(c * p.mlp_s_per_column for c, p in zip(cols, profiles))
    con = max(n * p.con_s_per_position for n, p in zip(pos, profiles))
    return att + mlp + 2 * con + comm_seconds(pos, batch, hidden, bandwidth_Bps)


def memory_caps(profiles, hidden, heads, intermediate, layers, bytes_per=4):
    """Per-rank caps on heads and columns: each rank's budget shared between attention and MLP
    parameters in the full model's proportion (head: q,k,v rows + o columns; column: up row + down column)."""
    d = hidden // heads
    per_head = layers * bytes_per * (4 * hidden * d + 3 * d)
    per_col = layers * bytes_per * (2 * hidden + 1)
    att_share = heads * per_head / (heads * per_head + intermediate * per_col)
    head_caps = [min(heads, int(p.memory_bytes * att_share // per_head)) if p.memory_bytes != float("inf") else heads
                 for p in profiles]
    col_caps = [min(intermediate, int(p.memory_bytes * (1 - att_share) // per_col))
                if p.memory_bytes != float("inf") else intermediate for p in profiles]
    return head_caps, col_caps


def plan_galaxy(profiles, *, hidden, heads, intermediate, seq, layers, batch, bandwidth_Bps, column_unit=1):
    """The Galaxy config keys (per-rank splits) minimising predicted latency, and that latency (s)."""
    head_caps, col_caps = memory_caps(profiles, hidden, heads, intermediate, layers)
    col_caps = [c - c % column_unit for c in col_caps]
    split = {
        "parallel": "galaxy",
        "tp_num_attention_heads_list": apportion(heads, [p.att_s_per_head for p in profiles], head_caps),
        "tp_intermediate_size_list": apportion(intermediate, [p.mlp_s_per_column for p in profiles], col_caps,
                                               column_unit),
        "seq_scatter_list": apportion(seq, [p.con_s_per_position for p in profiles]),
    }
    return split, layers * predict_layer_seconds(split, profiles, batch, hidden, bandwidth_Bps)


def even_galaxy(world, *, heads, intermediate, seq):
    """The even split (what a config without lists gets), for comparison."""
    def even(total):
        return [total // world + (r < total % world) for r in range(world)]
    return {"parallel": "galaxy", "tp_num_attention_heads_list": even(heads),
            "tp_intermediate_size_list": even(intermediate), "seq_scatter_list": even(seq)}
