"""Re-planning while running (what Galaxy+ adds): each rank times its own blocks every step, the
ranks share the per-unit costs, and when the split they run is predicted `threshold` slower than
the planner's best split for those costs `patience` steps in a row, every rank moves to that split
at the step boundary and goes on, without a restart.

    timed      the forward of every attention, MLP and connective block (module hooks: two clock
               reads a block call); attention is split by heads, MLP by columns, connectives by
               positions, so each rank's time divided by its units is its cost per unit
    shared     one all-gather of 3 numbers per rank per step: every rank then holds the same costs
               and takes the same decision (`Drift`, pure functions)
    the move   galaxy.reshard.relayout.move (shared with --elastic inference): only the
               rows that change owner are sent; AdamW's moments move like their parameters, its step
               counts, the LR schedule and the training step stay.

The prediction is the planner's cost model of the blocks' compute (galaxy.planner.split, with an
unlimited link): what crosses the link per layer changes only with the positions' split. A block's
time is modelled as fixed + per unit * units: linear (fixed 0) while the ranks have run one split,
fitted per rank and block from the split left and the split run after a move (`fit_block`).
"""
import functools
import time
from dataclasses import dataclass, field, fields
from statistics import median

import torch

from galaxy.comm import collectives as C
from galaxy.errors import ConfigError
from galaxy.layers.attention import Attention
from galaxy.layers.mlp import MLP
from galaxy.layers.transformer import Connective
from galaxy.plan import SP, TP, gqa_group
from galaxy.planner.run import plan_dims
from galaxy.planner.split import SPLIT_KEYS, RankProfile, plan_galaxy, predict_layer_seconds
from galaxy.reshard.relayout import Holding, move

BLOCKS = (Attention, MLP, Connective)
UNLIMITED_LINK = float("inf")


@dataclass(frozen=True)
class ReplanRule:
    threshold: float = 0.25  # move when the split run is predicted this much slower than the best one,
    patience: int = 3        # in this many measured steps in a row
    warmup: int = 1          # steps not measured at the start and after a move (first calls are slow)


def check_replan(cfg, plan):
    """The config's "replan" (None: off) against the plan, before any process starts; returns the rule."""
    given = cfg["replan"]
    if given is None:
        return None
    names = [f.name for f in fields(ReplanRule)]
    if set(given) - set(names):
        raise ConfigError(f"config key 'replan' has unknown keys {sorted(set(given) - set(names))}; it takes {names}")
    rule = ReplanRule(**given)
    number = (lambda v, kind: isinstance(v, kind) and not isinstance(v, bool))
    if not (number(rule.threshold, (int, float)) and rule.threshold > 0):
        raise ConfigError(f"config key 'replan': threshold must be a number > 0 (0.25 = 25 % slower), "
                          f"got {rule.threshold!r}")
    for key, least in (("patience", 1), ("warmup", 0)):
        if not (number(getattr(rule, key), int) and getattr(rule, key) >= least):
            raise ConfigError(f"config key 'replan': {key} must be an integer >= {least}, got {getattr(rule, key)!r}")
    if plan.tp_size < 2 or plan.att is not TP or plan.mlp is not TP:
        raise ConfigError(f"config key 'replan' moves attention heads and MLP columns between tensor ranks: it needs "
                          f"att_parallel_method and mlp_parallel_method TP over 2 or more ranks (layouts tp, galaxy); "
                          f"the plan is {plan.describe()}")
    if plan.pp_size > 1 or plan.dp_size > 1 or cfg["zero_stage"]:
        raise ConfigError("config key 'replan' re-plans one tensor group: it does not combine with pipeline "
                          "stages, data-parallel replicas or zero_stage")
    return rule


# ---- what is measured ---------------------------------------------------------------------

class BlockTimer:
    """Seconds this rank spends in the forward of its attention, MLP and connective blocks, summed
    until `take()`. On a GPU each clock read waits for the device (the times must be the kernels')."""

    def __init__(self, model, device):
        self.seconds, self.started, self.handles = [0.0] * len(BLOCKS), {}, []
        self.cuda = device.type == "cuda"
        for module in model.modules():
            kind = next((i for i, block in enumerate(BLOCKS) if isinstance(module, block)), None)
            if kind is not None:
                self.handles += [module.register_forward_pre_hook(self._start),
                                 module.register_forward_hook(functools.partial(self._stop, kind))]

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args):
        self.started[module] = self._now()

    def _stop(self, kind, module, args, out):
        self.seconds[kind] += self._now() - self.started.pop(module)

    def take(self):
        """(attention, MLP, connective) seconds since the last take."""
        out, self.seconds = self.seconds, [0.0] * len(BLOCKS)
        return out

    def remove(self):
        for handle in self.handles:
            handle.remove()


def unit_costs(seconds, plan, tp_rank):
    """One rank's (seconds per head, per column, per position) from its block seconds: a layer has
    two connectives. Positions count only when the connectives are sequence-parallel."""
    att, mlp, con = seconds
    positions = plan.positions[tp_rank] if plan.con is SP else 0
    return [att / plan.heads[tp_rank], mlp / plan.columns[tp_rank], con / (2 * positions) if positions else 0.0]


def split_of(plan):
    return dict(zip(SPLIT_KEYS, (list(plan.heads), list(plan.columns), list(plan.positions)), strict=True))


# ---- the decision (pure) ------------------------------------------------------------------

def block_seconds(costs, split):
    """Per rank, per block (attention, MLP, one connective): (units it owns, seconds) in `split`."""
    units = zip(*(split[k] for k in SPLIT_KEYS), strict=True)
    return [[(n, c * n) for n, c in zip(owned, rank_costs, strict=True)]
            for owned, rank_costs in zip(units, costs, strict=True)]


def fit_block(now, before=None):
    """(fixed seconds, seconds per unit) of one rank's block from its (units, seconds) now and at
    another share (`before`): a block call has a fixed part (launches, Python), which the linear
    model spreads over the units, so a shrinking share would look ever dearer per unit. Two shares
    identify both terms; with one share (or a line that is no cost: per unit <= 0 or fixed < 0,
    from noise or a changed speed) the cost is linear through now."""
    (n, t), (m, s) = now, before or now
    if m != n:
        per_unit = (t - s) / (n - m)
        if per_unit > 0 and t - per_unit * n >= 0:
            return t - per_unit * n, per_unit
    return 0.0, t / n


def fitted_profiles(costs, split, before=None):
    """Every rank's RankProfile (fixed and per-unit seconds per block) from its unit costs in
    `split` and, when given, block_seconds at the share before the last move."""
    now = block_seconds(costs, split)
    before = before or [[None] * len(BLOCKS)] * len(costs)
    fits = (map(fit_block, rank_now, rank_before) for rank_now, rank_before in zip(now, before, strict=True))
    return [RankProfile(att, mlp, con, att_s_fixed=att0, mlp_s_fixed=mlp0, con_s_fixed=con0)
            for (att0, att), (mlp0, mlp), (con0, con) in fits]


def best_split(costs, split, dims, before=None):
    """The planner's split (SPLIT_KEYS) for per-rank unit costs measured in `split` (and
    block_seconds at the share before, see fitted_profiles), and how many times faster than `split`
    it is predicted to run the blocks (1.0 when nothing was measured)."""
    profiles = fitted_profiles(costs, split, before)
    best, seconds = plan_galaxy(profiles, bandwidth_Bps=UNLIMITED_LINK, **dims)
    now = predict_layer_seconds(split, profiles, dims["batch"], dims["hidden"], UNLIMITED_LINK)
    return {k: best[k] for k in SPLIT_KEYS}, (now / seconds if seconds > 0 else 1.0)


@dataclass
class Drift:
    """When to move and where to, from every rank's unit costs step after step. Ranks that observe
    the same costs decide the same (the costs are all-gathered, so every rank does). After a move
    the costs are modelled from two shares, the one run and the one left (fit_block)."""
    rule: ReplanRule
    dims: dict  # plan_galaxy's hidden, heads, intermediate, seq, layers, batch, head_unit (layer_dims)
    window: list = field(default_factory=list)  # costs of the steps in a row over the threshold
    skip: int = 0
    before: list = None  # block_seconds of the window that decided the last move, in the split left
    predicted: float = None  # the last step's predicted speed-up of the best split (None: not measured)

    def __post_init__(self):
        self.restart()

    def restart(self):
        """After the start and after a move: forget the window, skip the warm-up steps."""
        self.window, self.skip = [], self.rule.warmup

    def observe(self, costs, split):
        """costs: per rank [s/head, s/column, s/position] of one step; split: the SPLIT_KEYS lists
        run. Returns (new split, predicted speed-up, steps measured) when the ranks should move, else None."""
        if self.skip:
            self.skip -= 1
            self.predicted = None
            return None
        self.predicted = best_split(costs, split, self.dims, self.before)[1]
        slow = self.predicted > 1 + self.rule.threshold
        self.window = self.window + [costs] if slow else []
        if len(self.window) < self.rule.patience:
            return None
        # the plan is made for the window's typical costs (a median per figure), not one noisy step
        typical = [[median(step[r][k] for step in self.window) for k in range(3)] for r in range(len(costs))]
        measured, self.window = len(self.window), []
        best, speedup = best_split(typical, split, self.dims, self.before)
        if speedup <= 1 + self.rule.threshold:
            return None
        self.before = block_seconds(typical, split)
        return best, speedup, measured


def layer_dims(cfg):
    """Drift's dims: the planner's model sizes (galaxy.planner.run.plan_dims) for one layer, heads
    moving in whole GQA groups (the link is left out, so the batch does not matter)."""
    return dict(plan_dims(cfg, batch=1), layers=1, head_unit=gqa_group(cfg))


# ---- one rank's side ----------------------------------------------------------------------

class Replanner:
    """Call `after_step(step)` at every step boundary (an optimizer step, an inference request):
    it measures, and when the ranks decide so, moves `owner` (a Holding: a Trainer, a Server; without
    one, model, ctx and cfg) to the new split.
    `moves` records (step, old plan, new plan, predicted speed-up, steps measured, seconds) of each
    move. Rank 0 logs that it watches, each move, and with `verbose` what every step measured
    (`measured_line`)."""

    def __init__(self, model, ctx, cfg, owner=None, log=print, verbose=False):
        self.holding, self.log = owner or Holding(model, ctx, cfg), log
        self.drift = Drift(check_replan(cfg, ctx.plan), layer_dims(cfg))
        self.timer = BlockTimer(model, ctx.device)
        self.moves, self.verbose = [], verbose
        if ctx.rank == 0:
            self.log(watching_line(self.drift.rule))

    model = property(lambda self: self.holding.model)
    ctx = property(lambda self: self.holding.ctx)

    @torch.no_grad()
    def shared_costs(self):
        """Every rank's unit costs since the last call (an all-gather over the tensor group)."""
        mine = unit_costs(self.timer.take(), self.ctx.plan, self.ctx.tp_rank)
        mine = torch.tensor([mine], dtype=torch.float64, device=self.ctx.device)
        return C.gather_along_dim(mine, 0, [1] * self.ctx.tp_size, self.ctx.tp_group).tolist()

    def after_step(self, step):
        costs = self.shared_costs()
        decision = self.drift.observe(costs, split_of(self.ctx.plan))
        if self.verbose and self.ctx.rank == 0:
            self.log(measured_line(step, costs, self.drift))
        if decision is None:
            return
        split, speedup, measured = decision
        before, seconds = self.ctx.plan, self.move_to(split)
        self.moves.append((step, before, self.ctx.plan, speedup, measured, seconds))
        if self.ctx.rank == 0:
            self.log(f"replan after step {step}: {_change(before, self.ctx.plan)} (predicted {speedup:.2f}x faster "
                     f"blocks, measured over {measured} step{'s' * (measured > 1)}); move took {seconds * 1e3:.0f} ms")

    def move_to(self, split):
        """Move to `split` (SPLIT_KEYS lists) now, on every rank of the tensor group; returns seconds."""
        start = time.perf_counter()
        self.timer.remove()
        move(self.holding, self.holding.cfg.with_layout(**split))
        self.timer = BlockTimer(self.model, self.ctx.device)
        self.drift.restart()
        return time.perf_counter() - start


def watching_line(rule):
    """What re-planning watches and when it moves, said once at start."""
    return (f"replan: watching each rank's attention, MLP and connective times; the ranks move to the planner's "
            f"best split when the split run is predicted over {rule.threshold:.0%} slower than it {rule.patience} "
            f"measured step{'s' * (rule.patience > 1)} in a row (the first {rule.warmup} not measured; --verbose "
            f"prints each step's measurements)")


def measured_line(step, costs, drift):
    """One step's measurements: every rank's speed per block (units per second) and the predicted
    speed-up of the best split."""
    if drift.predicted is None:
        return f"replan step {step}: warm-up, not measured"
    units = ("heads/s", "columns/s", "positions/s")
    speeds = "; ".join(f"rank {r} " + ", ".join(f"{1 / c:.3g} {u}" for c, u in zip(rank_costs, units, strict=True)
                                                if c > 0)
                       for r, rank_costs in enumerate(costs))
    return (f"replan step {step}: {speeds}; best split predicted {drift.predicted:.2f}x faster (moves over "
            f"{1 + drift.rule.threshold:.2f}x, {len(drift.window)} of {drift.rule.patience} steps in a row)")


def _change(before, after):
    return ", ".join(f"{name} {list(getattr(before, name))} -> {list(getattr(after, name))}"
                     for name in ("heads", "columns", "positions") if getattr(before, name) != getattr(after, name))
