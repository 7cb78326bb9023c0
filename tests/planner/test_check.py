"""The planner's check of its candidates (galaxy.planner.check) on made-up timings: seeded noise per
candidate and per round, plus load shared by the round (up to +50%, more than the gaps between
candidates), as on shared cores. One small test at world 2 checks that every rank decides alike."""
import random
from statistics import median

import pytest

from galaxy.planner.check import MIN_ROUNDS, check, from_rank0, leader, misses_allowed
from tests.helpers import run_ranks


class FakeTimer:
    """time_round for `check`: candidate n takes seconds[n] x the round's shared load x (1 + a
    Gaussian of sd noise[n]); records the names of each call."""

    def __init__(self, seconds, noise, seed=0, load=0.5):
        self.seconds, self.noise, self.load = seconds, noise, load
        self.rng, self.calls = random.Random(seed), []

    def __call__(self, names):
        self.calls.append(list(names))
        shared = 1 + self.rng.uniform(0, self.load)
        return {n: self.seconds[n] * shared * (1 + self.rng.gauss(0, self.noise[n])) for n in names}


def race(seconds, noise, seed=0, max_rounds=12):
    """check() of `seconds` (name -> true seconds, simplest first) with noise sd (relative) each."""
    timer = FakeTimer(seconds, dict.fromkeys(seconds, noise) if isinstance(noise, float) else noise, seed)
    return check(list(seconds), timer, max_rounds=max_rounds), timer


def test_a_lead_is_clear_when_coin_flips_would_rarely_give_so_few_misses():
    assert [misses_allowed(n) for n in range(1, 13)] == [-1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert [misses_allowed(n, min_rounds=4) for n in (3, 4, 8)] == [-1, 0, 1]


def test_the_leader_is_the_simplest_within_the_margin_of_the_fastest_median():
    assert leader({1: [1.0], 2: [0.95], 4: [0.90], 8: [0.905]}) == 4
    assert leader({1: [1.0], 2: [0.99], 4: [0.995]}) == 1  # 1% faster is inside the 2% margin
    assert leader({2: [0.5], 8: [0.3]}, margin=0.0) == 8
    # medians of the rounds all ran: "b" left after 2 rounds, the later rounds of "a" do not count
    assert leader({"a": [1.0, 1.0, 0.1, 0.1], "b": [0.9, 0.9]}) == "b"


def test_a_clear_winner_is_decided_at_the_minimum_rounds():
    for seed in range(10):
        verdict, timer = race({"local": 0.036, "sp": 0.100, "galaxy x1": 0.050, "galaxy x2": 0.052}, 0.03, seed)
        assert (verdict.best, verdict.decided, verdict.rounds) == ("local", True, MIN_ROUNDS)
        assert len(timer.calls) == 1 + MIN_ROUNDS  # one warm-up round, not counted
        assert [sorted(c) for c in timer.calls[1:]] == [sorted(verdict.times)] * MIN_ROUNDS
        assert [c[0] for c in timer.calls[1:]] == ["local", "sp", "galaxy x1"]  # the order rotates


def test_clearly_slower_candidates_leave_and_the_close_ones_get_the_rounds():
    seconds = {"local": 0.040, "sp": 0.100, "galaxy x1": 0.039, "galaxy x2": 0.045}
    picks = []
    for seed in range(10):
        verdict, timer = race(seconds, 0.04, seed)
        picks.append(verdict.best)
        assert {n: len(ts) for n, ts in verdict.times.items()} == {"local": 12, "sp": 3, "galaxy x1": 12,
                                                                   "galaxy x2": 3}
        assert all(sorted(c) == ["galaxy x1", "local"] for c in timer.calls[4:])
        # 2.5% apart, with 4% noise: inside what 12 rounds tell apart, so the medians pick: the more
        # complex one only where its median is more than the 2% margin faster
        local, galaxy = (median(verdict.times[n]) for n in ("local", "galaxy x1"))
        assert (verdict.best, verdict.decided) == ("galaxy x1" if galaxy * 1.02 < local else "local", False)
    assert picks.count("galaxy x1") == 4  # the truly faster one, where noise left it more than 2% ahead


def test_when_rounds_run_out_the_faster_median_runs_not_the_simpler():
    # the grid's 100 Mbit/s 16/16 row: Galaxy 2.7% faster but one slow round in five, so its lead is
    # never clear; running the simpler SP there cost 3%
    galaxy = iter([0.621, 0.622, 0.665, 0.620, 0.621, 0.622])  # a warm-up round, then five
    verdict = check(["sp", "galaxy x4"], lambda names: {"sp": 0.638, "galaxy x4": next(galaxy)}, max_rounds=5)
    assert (verdict.best, verdict.decided, verdict.rounds) == ("galaxy x4", False, 5)


def test_a_tie_goes_to_the_simpler():
    # equal, little noise: the more complex one is never 2% faster, so the simpler is clear at once
    for order in (["sp", "galaxy"], ["galaxy", "sp"]):
        verdict, _ = race(dict.fromkeys(order, 0.05), 0.003)
        assert (verdict.best, verdict.decided, verdict.rounds) == (order[0], True, MIN_ROUNDS)
    # 5% faster, then 5% slower, round after round: no lead is ever clear; the budget ends it
    turns = iter(range(100))
    verdict = check(["sp", "galaxy"], lambda names: {"sp": 1.0, "galaxy": 0.95 if next(turns) % 2 else 1.05},
                    max_rounds=8)
    assert (verdict.best, verdict.decided, verdict.rounds) == ("sp", False, 8)


def test_a_noisy_but_better_candidate_is_found_with_enough_rounds():
    """Galaxy 10% faster than local but 12% noisy per round: 3 rounds often cannot tell them apart
    (the medians of 3 pick, mostly right), 40 rounds can."""
    seconds, noise = {"local": 0.040, "galaxy": 0.036}, {"local": 0.01, "galaxy": 0.12}
    short = [race(seconds, noise, seed, max_rounds=3)[0] for seed in range(20)]
    long = [race(seconds, noise, seed, max_rounds=40)[0] for seed in range(20)]
    assert sum(v.best == "galaxy" and v.decided for v in short) == 13
    assert sum(v.best == "galaxy" for v in short) == 18  # undecided: the faster median of 3 rounds
    assert all(v.best == "galaxy" and v.decided for v in long)
    assert all(v.rounds > 3 for s, v in zip(short, long, strict=True) if not s.decided)  # it took more rounds


def test_too_small_a_budget_is_refused():
    with pytest.raises(ValueError, match="at least 3"):
        check(["a", "b"], FakeTimer({"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}), max_rounds=2)


def _decide_with_own_clock(rank, world):
    """Each rank's clock favours another candidate; `from_rank0` makes rank 0's timings count."""
    fast = "sp" if rank == 0 else "galaxy"
    verdict = check(["local", "sp", "galaxy"], lambda names: {n: 0.5 if n == fast else 1.0 for n in names},
                    max_rounds=5, agree=from_rank0)
    return verdict.best, verdict.rounds


def test_every_rank_takes_rank_0s_decision():
    assert run_ranks(_decide_with_own_clock, 2, timeout_s=60) == [("sp", MIN_ROUNDS)] * 2
