"""Re-planning live (galaxy/planner/replan.py): the decision as pure functions (threshold, patience,
the same on every rank); a move from one uneven split to another at world 2 and 3 gives the serial
model's outputs and continues training exactly as a run that never moved (losses, weights, AdamW
moments); a rank slowed mid-run makes the ranks move work away from it; bad "replan" keys stop
before any process starts."""
import re
from dataclasses import astuple

import pytest
import torch

from galaxy.app.infer import Server, eval_model, forward_fn
from galaxy.app.session import join, load_model
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.errors import ConfigError
from galaxy.models.bert.model import mlm_to_hf
from galaxy.models.checkpoint import gather_full_state
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.planner.profile import slow_down
from galaxy.planner.replan import (Drift, ReplanRule, Replanner, best_split, check_replan, fit_block, fitted_profiles,
                                   measured_line, watching_line)
from galaxy.planner.split import RankProfile, predict_layer_seconds
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks, run_script
from tests.models.llama.common import MODEL as LLAMA

BERT = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=100,
            seq_length=32, max_position_embeddings=32, batch_size=4, gradient_accumulation_steps=2,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, data="synthetic", warmup_steps=1)
# (split A, split B): a move between two uneven splits, every list changing
SPLITS = {
    ("bert", 2): ([3, 1], [88, 40], [20, 12]), ("bert", 3): ([2, 1, 1], [64, 32, 32], [16, 8, 8]),
    ("llama", 2): ([6, 2], [64, 32], [14, 10]), ("llama", 3): ([4, 2, 2], [48, 24, 24], [10, 8, 6]),
}
MOVED = {
    ("bert", 2): ([1, 3], [40, 88], [12, 20]), ("bert", 3): ([1, 1, 2], [20, 60, 48], [6, 16, 10]),
    ("llama", 2): ([2, 6], [30, 66], [8, 16]), ("llama", 3): ([2, 2, 4], [20, 40, 36], [6, 10, 8]),
}
KEYS = ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list")
STEPS, MOVE_AFTER = 3, 2


def config(model, world, **extra):
    shape = BERT if model == "bert" else dict(LLAMA, data="corpus")
    split = dict(zip(KEYS, SPLITS[model, world], strict=True)) if world > 1 else {}
    return load_config(None, {**shape, **split, "model": model, "parallel": "galaxy" if world > 1 else "serial",
                              **extra})


def ids_of(cfg):
    return torch.randint(4, cfg["vocab_size"], (2, cfg["seq_length"]), generator=torch.Generator().manual_seed(1))


# ---- the decision, without processes --------------------------------------------------------

DIMS = dict(hidden=64, heads=4, intermediate=128, seq=32, layers=1, batch=1, head_unit=1)
EVEN = dict(zip(KEYS, ([2, 2], [64, 64], [16, 16]), strict=True))
EQUAL = [[1.0, 0.01, 0.001], [1.0, 0.01, 0.001]]
SLOW = [[1.0, 0.01, 0.001], [4.0, 0.04, 0.004]]  # rank 1 four times slower at everything


def test_best_split_moves_work_from_a_slow_rank_and_keeps_a_balanced_one():
    assert best_split(EQUAL, EVEN, DIMS) == (EVEN, 1.0)
    split, speedup = best_split(SLOW, EVEN, DIMS)
    assert split == dict(zip(KEYS, ([3, 1], [103, 25], [26, 6]), strict=True))
    assert speedup > 1.9


def test_drift_needs_patience_steps_in_a_row_over_the_threshold():
    drift = Drift(ReplanRule(threshold=0.25, patience=3, warmup=1), DIMS)
    assert drift.observe(SLOW, EVEN) is None  # warm-up: not measured
    assert [drift.observe(c, EVEN) for c in (SLOW, SLOW, EQUAL, SLOW, SLOW)] == [None] * 5  # a balanced step resets
    split, speedup, measured = drift.observe(SLOW, EVEN)
    assert split["tp_num_attention_heads_list"] == [3, 1] and measured == 3 and speedup > 1.9
    assert drift.observe(SLOW, EVEN) is None  # the window starts again


def test_drift_ignores_a_slowdown_the_split_cannot_use_and_one_under_the_threshold():
    drift = Drift(ReplanRule(threshold=0.25, patience=1, warmup=0), DIMS)
    slower = [[1.0, 0.01, 0.001], [1.2, 0.012, 0.0012]]  # 20 %: the best split gains less than 25 %
    both = [[3.0, 0.03, 0.003], [3.0, 0.03, 0.003]]  # every rank slower: nothing to move
    assert [drift.observe(c, EVEN) for c in (slower, both)] == [None, None]


def test_ranks_observing_the_same_costs_decide_the_same():
    # jitter on every rank, and rank 2 three times slower from step 4 on
    noisy = [[[(1.0 + 0.1 * ((s * 7 + r) % 3)) * (3 if r == 2 and s >= 4 else 1), 0.01, 0.001] for r in range(3)]
             for s in range(12)]
    dims = dict(DIMS, heads=6)
    split = dict(zip(KEYS, ([2, 2, 2], [43, 43, 42], [11, 11, 10]), strict=True))
    decisions = []
    for _ in range(3):  # three ranks, each with its own Drift
        drift = Drift(ReplanRule(threshold=0.1, patience=2), dims)
        decisions.append([drift.observe(c, split) for c in noisy])
    assert decisions[0] == decisions[1] == decisions[2] and any(decisions[0])


def test_two_shares_identify_a_blocks_fixed_and_per_unit_seconds():
    assert fit_block((4, 6.0)) == (0.0, 1.5)  # one share: linear
    assert fit_block((4, 6.0), (8, 10.0)) == (2.0, 1.0)  # 2 s + 1 s per unit, from either order
    assert fit_block((8, 10.0), (4, 6.0)) == (2.0, 1.0)
    assert fit_block((4, 6.0), (8, 4.0)) == (0.0, 1.5)  # dearer with fewer units: no cost line, linear


# per block (attention, MLP, connective): (fixed seconds, seconds per unit) of the fast rank; rank 1
# is 4 times slower at both (an emulated slow device stretches a call's overhead too)
FAST = [(8.0, 1.0), (0.64, 0.01), (0.32, 0.02)]
TRUE = [FAST, [(4 * f, 4 * u) for f, u in FAST]]
WIDE = dict(DIMS, heads=12, intermediate=96, seq=48)


def _measured(split):
    """The unit costs the ranks measure in `split` when their blocks take TRUE's seconds."""
    shares = zip(*(split[k] for k in KEYS), strict=True)
    return [[(f + n * u) / n for (f, u), n in zip(rank, owned, strict=True)]
            for rank, owned in zip(TRUE, shares, strict=True)]


def test_a_slow_rank_with_fixed_costs_makes_one_move_where_the_linear_model_made_two():
    drift = Drift(ReplanRule(threshold=0.25, patience=3, warmup=1), WIDE)
    split, moves = dict(zip(KEYS, ([6, 6], [48, 48], [24, 24]), strict=True)), []
    for step in range(16):
        decision = drift.observe(_measured(split), split)
        if decision:
            split, moves = decision[0], moves + [(step, decision[0])]
            drift.restart()
    assert [(step, moved["tp_num_attention_heads_list"]) for step, moved in moves] == [(3, [10, 2])], moves
    # in that split the linear model (what it costs per unit now, nothing else) would move again,
    # further from rank 1, for a gain of ~2x it predicts but the blocks' real seconds do not give
    linear, predicted = best_split(_measured(split), split, WIDE)
    assert linear["tp_num_attention_heads_list"] == [11, 1] and predicted > 1.9
    truth = [RankProfile(*(u for _, u in r), att_s_fixed=r[0][0], mlp_s_fixed=r[1][0], con_s_fixed=r[2][0])
             for r in TRUE]
    fitted = fitted_profiles(_measured(split), split, drift.before)  # what the ranks model after the move
    assert [round(v, 9) for p in fitted for v in astuple(p)] == [v for p in truth for v in astuple(p)]
    real = (lambda s: predict_layer_seconds(s, truth, 1, 1, float("inf")))  # noqa: E731
    assert real(split) / real(linear) < 1.25, real(split) / real(linear)


@pytest.mark.parametrize("replan, layout, message", [
    ({"treshold": 0.2}, "galaxy", "unknown keys ['treshold']"),
    ({"threshold": 0}, "galaxy", "threshold must be a number > 0"),
    ({"patience": 0}, "galaxy", "patience must be an integer >= 1"),
    ({"warmup": 1.5}, "galaxy", "warmup must be an integer >= 0"),
    ({}, "sp", "needs att_parallel_method and mlp_parallel_method TP"),
    ({}, "galaxy2", "needs att_parallel_method and mlp_parallel_method TP"),
])
def test_bad_replan_keys_name_the_problem(replan, layout, message):
    cfg = load_config(None, {**BERT, "parallel": layout, "replan": replan})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_replan(cfg, build_plan(cfg, 2))


def test_replan_is_refused_before_processes_start():
    out = run_script("infer_galaxy.py", "--world", "2", "--mlp_parallel_method", "SP", "--replan", "{}", timeout=60)
    assert out.returncode == 2 and "config key 'replan' moves attention heads" in out.stderr, out.stderr
    assert "[rank" not in out.stdout + out.stderr


# ---- the move, on 2 and 3 ranks ---------------------------------------------------------------

def _infer_then_move(cfg, world, rank):
    model, ctx = eval_model(cfg, build_plan(cfg, world), rank)
    assert Server(model, ctx, cfg).replanner is not None  # replan {} is on, with the default rule
    replanner = Replanner(model, ctx, cfg)
    replanner.move_to(dict(zip(KEYS, MOVED[cfg["model"], world], strict=True)))
    with torch.no_grad():
        return forward_fn(replanner.model, cfg["model"])(ids_of(cfg), None), list(replanner.model.ctx.plan.heads)


def _train(cfg, world, rank, move):
    """Losses of STEPS steps (moving after MOVE_AFTER when `move`), then the full weights and AdamW moments."""
    ctx = join(cfg, build_plan(cfg, world), rank)
    model, _ = load_model(cfg, ctx, rank)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], 64), STEPS,
                      log=lambda line: None)
    replanner = Replanner(model, ctx, cfg, trainer)
    losses = []
    for step in range(STEPS):
        losses.append(trainer.train_step()["loss"])
        if move and step + 1 == MOVE_AFTER:
            replanner.move_to(dict(zip(KEYS, MOVED[cfg["model"], world], strict=True)))
    state = lambda key: gather_full_state(trainer.model, trainer.ctx, mlm_to_hf,  # noqa: E731
                                          lambda p: trainer.opt.state[p][key])
    full = {"weights": gather_full_state(trainer.model, trainer.ctx, mlm_to_hf),
            "exp_avg": state("exp_avg"), "exp_avg_sq": state("exp_avg_sq")}
    return losses, full, trainer.sched.get_last_lr(), list(trainer.model.ctx.plan.columns)


def _moves(rank, world):
    out = {model: _infer_then_move(config(model, world, replan={}), world, rank) for model in ("bert", "llama")}
    out["bert tiled"] = _infer_then_move(config("bert", world, replan={}, overlap_tiles=2), world, rank)
    cfg = config("bert", world, replan={})
    out["moved"], out["stayed"] = _train(cfg, world, rank, True), _train(cfg, world, rank, False)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_a_move_keeps_outputs_serial_and_training_exact(world):
    serial = {}
    for model in ("bert", "llama"):
        net = build_model(config(model, 1)).eval()
        with torch.no_grad():
            serial[model] = net(ids_of(config(model, 1)), None)
    for rank, out in enumerate(run_ranks(_moves, world, timeout_s=240)):
        for case in ("bert", "llama", "bert tiled"):
            model = case.split()[0]
            got, heads = out[case]
            assert heads == MOVED[model, world][0]  # it runs in the new split
            assert rel_err(got, serial[model]) < 1e-5, (case, rank, rel_err(got, serial[model]))
        (losses, full, lr, columns), (want_losses, want_full, want_lr, _) = out["moved"], out["stayed"]
        assert columns == MOVED["bert", world][1]
        for got, want in zip(losses, want_losses, strict=True):
            assert abs(got - want) / abs(want) < 1e-5, (rank, losses, want_losses)
        assert lr == want_lr
        for kind, tensors in full.items():
            # a key bias's gradient is analytically 0 (softmax ignores a shift), so its Adam state and
            # weight are rounding noise in either run: each tensor is compared at least at 1e-3 of
            # the largest tensor of its kind, where a misplaced slice of any other tensor still shows
            floor = 1e-3 * max(t.double().norm().item() for t in want_full[kind].values())
            for name, tensor in tensors.items():
                error = rel_err(tensor, want_full[kind][name], floor)
                assert error < 1e-5, (kind, name, rank, error)


# ---- a rank slowed mid-run ----------------------------------------------------------------

SLOWED_FROM, MOST_STEPS = 4, 12


def _slowed_mid_run(rank, world):
    """Training with rank 1 made 6 times slower from step SLOWED_FROM on, until the ranks move."""
    cfg = load_config(None, {**BERT, "parallel": "galaxy", "seq_length": 64, "max_position_embeddings": 64,
                             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                             "replan": {"threshold": 0.25, "patience": 3, "warmup": 2}})
    ctx = join(cfg, build_plan(cfg, world), rank)
    model, _ = load_model(cfg, ctx, rank)
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], 64),
                      MOST_STEPS, log=lambda line: None)
    logged = []
    replanner = Replanner(model, ctx, cfg, trainer, log=logged.append, verbose=True)
    for step in range(1, MOST_STEPS + 1):
        with slow_down(rank, {1} if step >= SLOWED_FROM else set(), factor=6):
            trainer.train_step()
        replanner.after_step(step)
        if replanner.moves:  # every rank decides the same, so all stop here together
            break
    return [(step, list(before.heads), list(after.heads), list(after.columns))
            for step, before, after, *_ in replanner.moves], logged


def test_a_rank_slowed_mid_run_makes_the_ranks_move_work_away_from_it():
    (moves, logged), (moves_1, logged_1) = run_ranks(_slowed_mid_run, 2, timeout_s=240)
    assert moves == moves_1 and len(moves) == 1, (moves, moves_1)
    step, before, heads, columns = moves[0]
    assert before == [2, 2] and heads[1] < heads[0] and columns[1] < columns[0], moves
    assert step >= SLOWED_FROM  # (a noisy step just before the slow-down may count towards patience)
    # rank 0 says at start that it watches, then (verbose) what each step measured, then the move
    assert logged[0].startswith("replan: watching") and not logged_1, (logged, logged_1)
    assert logged[1:3] == ["replan step 1: warm-up, not measured", "replan step 2: warm-up, not measured"], logged
    measured = logged[3:3 + step - 2]
    assert all(re.match(r"replan step \d+: rank 0 [\d.e+]+ heads/s, .*; rank 1 .* positions/s; best split predicted", m)
               for m in measured), logged
    assert logged[-1].startswith(f"replan after step {step}: heads [2, 2] -> "), logged


def test_what_replan_says_it_watches_and_measures():
    drift = Drift(ReplanRule(threshold=0.25, patience=3, warmup=1), DIMS)
    assert watching_line(drift.rule) == (
        "replan: watching each rank's attention, MLP and connective times; the ranks move to the planner's best "
        "split when the split run is predicted over 25% slower than it 3 measured steps in a row (the first 1 not "
        "measured; --verbose prints each step's measurements)")
    drift.observe(SLOW, EVEN)
    assert measured_line(1, SLOW, drift) == "replan step 1: warm-up, not measured"
    drift.observe(SLOW, EVEN)
    assert measured_line(2, SLOW, drift) == (
        "replan step 2: rank 0 1 heads/s, 100 columns/s, 1e+03 positions/s; rank 1 0.25 heads/s, 25 columns/s, "
        f"250 positions/s; best split predicted {drift.predicted:.2f}x faster (moves over 1.25x, 1 of 3 steps in a row)")
