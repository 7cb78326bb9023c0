"""The planner's check of its candidates: which one to run, decided from timings as noisy as shared
cores and links make them, the same on every rank.

Candidates are timed in rounds; each round times every candidate still in the race once, in an
order rotated per round, so load that comes and goes falls on all of them alike. Each candidate is
compared with the leader round by round (paired), not by medians of a few rounds:

- A lead is clear when the leader was faster in all but so few rounds that coin flips (no real
  difference) would give that few misses no more often than `min_rounds` rounds out of `min_rounds`
  do (2**-min_rounds; a sign test): 3 of 3 rounds, 5 of 6, 7 of 9, 9 of 12.
- After each round the candidates clearly behind the leader leave the race, so further rounds go to
  the close ones. The race ends when one is left, or after `max_rounds`, when the leader of those
  still in it wins: the fastest median, unless a simpler one is within `margin` of it (a gain that
  small does not pay for extra messages, tiles or ranks). Running the simplest of the close ones
  instead cost 3% where noise hid a real gain (docs/results.md, 100 Mbit/s 16/16).
- Candidates come simplest first (e.g. local, SP, Galaxy with 1, 2, 4 tiles). In a comparison the
  later one's seconds weigh 1 + `margin`: it has to be more than `margin` faster in a round for the
  round to count as its, so a tie goes to the simpler one.
"""
import math
from dataclasses import dataclass
from statistics import median

import torch.distributed as dist

MIN_ROUNDS = 3
MARGIN = 0.02  # a gain smaller than this does not pay for a more complex layout's extra messages


@dataclass
class Verdict:
    best: str      # the candidate to run
    decided: bool  # False: max_rounds ran out with several candidates close; best is their leader()
    rounds: int    # rounds timed after the warm-up
    times: dict    # name -> its seconds in each round it ran (the candidates' order)

    def medians(self):
        return {name: median(ts) for name, ts in self.times.items()}


def misses_allowed(rounds, min_rounds=MIN_ROUNDS):
    """How many of `rounds` paired rounds may go against a leader whose lead still counts as clear;
    -1 while no lead can be clear (fewer than min_rounds rounds)."""
    alpha = 0.5 ** min_rounds
    misses, chance = -1, 0.0
    while misses + 1 < rounds:
        chance += math.comb(rounds, misses + 1) / 2 ** rounds  # of at most misses + 1 by coin flips
        if chance > alpha:
            break
        misses += 1
    return misses


def leader(times, margin=MARGIN):
    """The simplest candidate (first in `times`, name -> seconds per round) whose median over the
    rounds all of them ran is within `margin` of the fastest median."""
    rounds = min(len(ts) for ts in times.values())
    medians = {name: median(ts[:rounds]) for name, ts in times.items()}
    fastest = min(medians.values())
    return next(name for name, seconds in medians.items() if seconds <= fastest * (1 + margin))


def clearly_ahead(lead, other, lead_simpler, margin=MARGIN, min_rounds=MIN_ROUNDS):
    """Whether seconds per round `lead` are clearly below `other` (the same rounds); the more
    complex of the two weighs 1 + margin."""
    w_lead, w_other = (1.0, 1.0 + margin) if lead_simpler else (1.0 + margin, 1.0)
    misses = sum(a * w_lead >= b * w_other for a, b in zip(lead, other, strict=True))
    return misses <= misses_allowed(len(lead), min_rounds)


def still_standing(times, margin=MARGIN, min_rounds=MIN_ROUNDS):
    """The candidates (name -> seconds per round, all of the same rounds, simplest first) that the
    leader is not clearly ahead of, the leader included, in their order."""
    lead = leader(times, margin)
    order = list(times)
    return [name for name in order if name == lead or not clearly_ahead(
        times[lead], times[name], order.index(lead) < order.index(name), margin, min_rounds)]


def check(names, time_round, *, max_rounds, min_rounds=MIN_ROUNDS, margin=MARGIN, warmup=1, agree=None):
    """Race the candidates `names` (simplest first; see the module's docstring) and return a Verdict.
    time_round(names) times each of `names` once, in that order, and returns {name: seconds}; the
    first `warmup` rounds are not counted. agree(seconds) must return the same on every rank
    (`from_rank0`; ranks' clocks differ a little), so that all ranks take the same decisions."""
    if max_rounds < min_rounds:
        raise ValueError(f"{max_rounds} rounds cannot tell candidates apart: the check needs at least {min_rounds}")
    agree = agree or (lambda seconds: seconds)
    for _ in range(warmup):
        time_round(list(names))
    times, standing = {name: [] for name in names}, list(names)
    for round_ in range(max_rounds):
        k = round_ % len(standing)
        seconds = agree(time_round(standing[k:] + standing[:k]))
        for name in standing:
            times[name].append(seconds[name])
        standing = still_standing({name: times[name] for name in standing}, margin, min_rounds)
        if len(standing) == 1:
            return Verdict(standing[0], True, round_ + 1, times)
    return Verdict(leader({name: times[name] for name in standing}, margin), False, max_rounds, times)


def from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
