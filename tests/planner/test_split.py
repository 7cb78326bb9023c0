"""The planner's split logic (pure functions, no processes)."""
import itertools
import random

import pytest

from galaxy.comm.overlap import parse_tiles, tiles_name

from galaxy.plan import build_plan
from galaxy.planner.split import (RankProfile, apportion, comm_seconds, even_galaxy, even_pipeline,
                                  pipeline_seconds, plan_galaxy, plan_layouts, plan_pipeline, plan_stage_layers,
                                  predict_layer_seconds, race, tiled_variants)


def test_apportion_is_proportional_to_speed_and_exact():
    assert apportion(12, [1.0, 1.0]) == [6, 6]
    assert apportion(12, [1.0, 2.0]) == [8, 4]  # the 2x slower rank gets half the work
    assert max(n * c for n, c in zip(apportion(13, [1.0, 2.0, 4.0]), [1.0, 2.0, 4.0], strict=True)) == 8
    assert sum(apportion(3072, [0.3, 0.7, 1.1], unit=64)) == 3072


def test_apportion_minimises_the_slowest_rank():
    costs = [1.0, 1.7, 2.9]
    best = max(n * c for n, c in zip(apportion(20, costs), costs, strict=True))
    brute = min(max(a * costs[0], b * costs[1], (20 - a - b) * costs[2])
                for a in range(1, 19) for b in range(1, 20 - a))
    assert best == pytest.approx(brute)


def test_apportion_with_fixed_costs_is_optimal_against_brute_force():
    rng = random.Random(1)
    for _ in range(80):
        ranks, unit = rng.randint(2, 3), rng.choice([1, 2])
        total = unit * rng.randint(ranks, 9)
        costs = [rng.uniform(0.1, 3.0) for _ in range(ranks)]
        fixed = [rng.choice([0.0, rng.uniform(0.0, 10.0)]) for _ in range(ranks)]
        caps = [unit * rng.randint(1, total // unit) for _ in range(ranks)]
        shares = [n for n in itertools.product(range(unit, total + 1, unit), repeat=ranks)
                  if sum(n) == total and all(a <= c for a, c in zip(n, caps, strict=True))]
        if not shares:
            continue
        seconds = (lambda n: max(f + a * c for f, a, c in zip(fixed, n, costs, strict=True)))  # noqa: E731
        assert seconds(apportion(total, costs, caps, unit, fixed)) == pytest.approx(min(map(seconds, shares)))
    # a fixed part moves units away from its rank (a linear model cannot tell it apart)
    assert apportion(12, [1.0, 1.0], fixed=[0.0, 4.0]) == [8, 4]


def test_apportion_respects_caps_units_and_errors():
    assert apportion(12, [1.0, 2.0], caps=[5, 12]) == [5, 7]
    assert apportion(256, [1.0, 1.0], unit=64) == [128, 128]
    with pytest.raises(ValueError, match="memory budgets"):
        apportion(12, [1.0, 1.0], caps=[5, 5])
    with pytest.raises(ValueError, match="multiple of unit"):
        apportion(100, [1.0, 1.0], unit=64)


def _profiles(slow):
    fast = RankProfile(att_s_per_head=1e-3, mlp_s_per_column=1e-5, con_s_per_position=1e-6)
    slowed = RankProfile(slow * 1e-3, slow * 1e-5, slow * 1e-6)
    return [fast, slowed]


def test_slow_rank_gets_smaller_share_and_lower_predicted_latency():
    dims = dict(hidden=768, heads=12, intermediate=3072, seq=512, layers=12, batch=1, bandwidth_Bps=1.25e8)
    split, predicted = plan_galaxy(_profiles(2.0), **dims)
    assert split["tp_num_attention_heads_list"] == [8, 4]
    assert split["tp_intermediate_size_list"] == [2048, 1024]
    assert split["seq_scatter_list"] == [261, 251]  # a position costs its owner 25 us of sends, 1 or 2 us of compute
    even = even_galaxy(2, heads=12, intermediate=3072, seq=512)
    assert predicted < 12 * predict_layer_seconds(even, _profiles(2.0), 1, 768, 1.25e8)
    free = plan_galaxy(_profiles(2.0), **dict(dims, bandwidth_Bps=float("inf")))[0]
    assert free["seq_scatter_list"] == [342, 170]  # a free link: positions in proportion to speed
    by_speed = dict(split, seq_scatter_list=free["seq_scatter_list"])
    assert predicted < 12 * predict_layer_seconds(by_speed, _profiles(2.0), 1, 768, 1.25e8)


def test_memory_budget_caps_a_rank():
    fast, slow = _profiles(1.0)
    tight = RankProfile(fast.att_s_per_head, fast.mlp_s_per_column, fast.con_s_per_position, memory_bytes=60e6)
    split, _ = plan_galaxy([tight, slow], hidden=768, heads=12, intermediate=3072, seq=512, layers=12, batch=1,
                           bandwidth_Bps=1e9)
    assert split["tp_num_attention_heads_list"][0] < 6 and split["tp_intermediate_size_list"][0] < 1536


def test_comm_model_counts_padding_of_uneven_shards():
    assert comm_seconds([512], 1, 768, 1e9) == 0.0
    assert comm_seconds([300, 212], 1, 768, 1e9) > comm_seconds([256, 256], 1, 768, 1e9)


def test_pipeline_latency_is_the_first_trip_plus_one_bottleneck_step_per_micro_batch():
    assert pipeline_seconds([2, 2], [1.0, 1.0], 4) == pytest.approx((4 + 2 - 1) * 2.0)  # GPipe's (M + S - 1) * T
    assert pipeline_seconds([3, 1], [1.0, 2.0], 4, extra_s=[0.5, 0.0], link_s=0.25) == pytest.approx(
        3.5 + 2.0 + 0.25 + 3 * 3.5)
    assert pipeline_seconds([1, 1], [1.0, 1.0], 3, link_s=5.0) == pytest.approx(2.0 + 5.0 + 2 * 5.0)  # link-bound


def test_slow_stage_gets_fewer_layers_within_memory_caps():
    assert plan_stage_layers(12, [1.0, 2.0], 8)[0] == [8, 4]
    assert plan_stage_layers(12, [1.0, 2.0], 8, caps=[5, 12])[0] == [5, 7]
    assert plan_stage_layers(12, [2.0, 1.0], 8, extra_s=[2.0, 0.0])[0] == [3, 9]  # embeddings weigh on stage 0
    # one micro-batch visits the stages one after another: every layer it can goes to the fastest stage
    assert plan_stage_layers(6, [1.0, 2.0, 3.0], 1) == ([4, 1, 1], pytest.approx(9.0))


def test_many_micro_batches_give_apportions_min_max_split():
    costs = [1.0, 1.7, 2.9]
    split, _ = plan_stage_layers(20, costs, 1000)
    proportional = apportion(20, costs)
    slowest = (lambda counts: max(n * c for n, c in zip(counts, costs, strict=True)))  # noqa: E731
    assert slowest(split) == slowest(proportional)


def test_stage_layers_are_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        stages = rng.randint(1, 3)
        layers = rng.randint(stages, 7)
        t = [rng.uniform(0.5, 3.0) for _ in range(stages)]
        extra = [rng.uniform(0.0, 2.0) for _ in range(stages)]
        caps = [rng.randint(1, layers) for _ in range(stages)]
        micro, link = rng.randint(1, 5), rng.uniform(0.0, 3.0)
        if sum(caps) < layers:
            continue
        split, seconds = plan_stage_layers(layers, t, micro, extra_s=extra, link_s=link, caps=caps)
        assert sum(split) == layers and all(1 <= n <= c for n, c in zip(split, caps, strict=True))
        brute = min(pipeline_seconds(n, t, micro, extra, link)
                    for n in itertools.product(*(range(1, c + 1) for c in caps)) if sum(n) == layers)
        assert seconds == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("args, kwargs, message", [
    ((1, [1.0, 1.0], 4), {}, "at least one layer"),
    ((4, [1.0, 0.0], 4), {}, "positive and finite"),
    ((4, [1.0, 1.0], 0), {}, "num_microbatches 0"),
    ((4, [1.0, 1.0], 4), {"caps": [2, 1]}, r"memory caps \[2, 1\]"),
    ((4, [1.0, 1.0], 4), {"caps": [0, 4]}, "memory caps"),
    ((4, [1.0, 1.0], 4), {"caps": [4]}, "1 entries for 2 stages"),
])
def test_bad_stage_input_is_a_clear_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_stage_layers(*args, **kwargs)


PIPE = dict(hidden=256, heads=4, intermediate=1024, seq=128, layers=4, batch=4, microbatches=4, bandwidth_Bps=1e8)


def _cfg(keys):
    return dict(num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, seq_length=128,
                batch_size=16, num_microbatches=4, **keys)


def test_pipeline_plan_gives_the_slowed_stage_fewer_layers_and_loads():
    split, predicted = plan_pipeline(_profiles(2.0), 2, **PIPE)
    assert split == {"parallel": "pp", "stage_num_hidden_layers_list": [3, 1]}
    even, even_predicted = even_pipeline(_profiles(2.0), 2, **PIPE)
    assert even["stage_num_hidden_layers_list"] == [2, 2] and predicted < even_predicted
    assert build_plan(_cfg(split), 2).stage_layers == (3, 1)


def test_pipeline_of_galaxy_stages_plans_one_tensor_split_and_memory_caps_stages():
    fast, slow = _profiles(2.0)
    split, _ = plan_pipeline([fast, fast, fast, slow], 2, **PIPE)  # the slow rank: stage 1, tensor rank 1
    assert split["tp_num_attention_heads_list"][1] < split["tp_num_attention_heads_list"][0]
    assert build_plan(_cfg(split), 4).pp_size == 2
    # a budget for about one layer's parameters keeps the fast stage to one layer
    small = RankProfile(fast.att_s_per_head, fast.mlp_s_per_column, fast.con_s_per_position, memory_bytes=4e6)
    split, _ = plan_pipeline([small, slow], 2, **PIPE)
    assert split["stage_num_hidden_layers_list"] == [1, 3]


def test_tiled_variants_measure_the_planned_split_once_per_tile_count():
    split = {"parallel": "galaxy", "seq_scatter_list": [3, 1]}
    assert tiled_variants(split, [1]) == {"planned": split}
    variants = tiled_variants(split, [1, 4])
    assert list(variants) == ["planned, 1 tile(s)", "planned, 4 tile(s)"]
    assert variants["planned, 4 tile(s)"] == dict(split, overlap_tiles=4) and "overlap_tiles" not in split


LAYOUT_DIMS = dict(hidden=1024, heads=16, intermediate=4096, seq=512, layers=2, batch=1)


def _best(candidates):
    return min(candidates, key=lambda name: candidates[name][1])


def test_plan_layouts_runs_alone_on_the_fastest_rank_when_the_link_is_slow():
    fast, slow = _profiles(4.0)
    candidates = plan_layouts([slow, fast], bandwidth_Bps=1e3, **LAYOUT_DIMS)
    keys, seconds = candidates["local"]
    assert _best(candidates) == "local" and keys == {"parallel": "serial", "rank": 1}
    per_layer = 16 * fast.att_s_per_head + 4096 * fast.mlp_s_per_column + 2 * 512 * fast.con_s_per_position
    assert seconds == pytest.approx(2 * per_layer + fast.embed_s)


def test_plan_layouts_splits_on_a_fast_link_and_counts_every_collective():
    profiles = _profiles(2.0)
    candidates = plan_layouts(profiles, bandwidth_Bps=1e15, **LAYOUT_DIMS)
    assert _best(candidates) in ("sp", "galaxy")
    sp_keys, _ = candidates["sp"]
    assert sp_keys["parallel"] == "sp" and sp_keys["seq_scatter_list"][0] > sp_keys["seq_scatter_list"][1]
    galaxy_keys, galaxy_s = candidates["galaxy"]
    _, planned = plan_galaxy(profiles, bandwidth_Bps=1e15, intermediate=4096, **{k: v for k, v in LAYOUT_DIMS.items()
                                                                              if k != "intermediate"})
    assert galaxy_s == pytest.approx(planned)  # no embeddings in the profiles, no link time at this bandwidth
    slower = plan_layouts(profiles, bandwidth_Bps=1e8, **LAYOUT_DIMS)
    # per layer 2 all-gathers (the longer shard sets them) and 2 reduce-scatters (half the activation each);
    # then the output gather. On the slower link the positions are split more evenly (fewer bytes for the longest)
    split = slower["galaxy"][0]
    assert max(split["seq_scatter_list"]) < max(galaxy_keys["seq_scatter_list"])
    compute = 2 * predict_layer_seconds(split, profiles, 1, 1024, float("inf"))
    longest, half = max(split["seq_scatter_list"]) * 1024 * 4, 512 * 1024 * 4 / 2
    assert slower["galaxy"][1] - compute == pytest.approx((2 * 2 * (longest + half) + longest) / 1e8)
    longest = max(sp_keys["seq_scatter_list"]) * 1024 * 4
    assert slower["sp"][1] - candidates["sp"][1] == pytest.approx((2 * 2 + 1) * longest / 1e8)  # K, V per layer; output


def test_plan_layouts_offers_the_even_splits_beside_the_planned_ones():
    profiles = _profiles(3.0)
    candidates = plan_layouts(profiles, bandwidth_Bps=1e15, **LAYOUT_DIMS)
    assert list(candidates) == ["local", "tp", "sp", "galaxy even", "galaxy"]  # simplest first
    even = even_galaxy(2, heads=16, intermediate=4096, seq=512)
    assert candidates["galaxy even"][0] == even and candidates["tp"][0] == {"parallel": "tp"}
    # TP: heads and columns even, both connectives over every position on every rank; the slow rank sets each block
    slow = max(profiles, key=lambda p: p.att_s_per_head)
    tp_layer = 8 * slow.att_s_per_head + 2048 * slow.mlp_s_per_column + 2 * 512 * slow.con_s_per_position
    assert candidates["tp"][1] == pytest.approx(2 * tp_layer + slow.embed_s)
    assert candidates["galaxy"][1] < candidates["galaxy even"][1] < candidates["tp"][1]
    slower = plan_layouts(profiles, bandwidth_Bps=1e8, **LAYOUT_DIMS)
    # two all-reduces a layer, each sending (ring) 2 (p - 1) / p = 1 activation per rank at world 2
    assert slower["tp"][1] - candidates["tp"][1] == pytest.approx(2 * 2 * 512 * 1024 * 4 / 1e8)


def test_the_check_races_the_even_splits_and_each_tiling_of_the_plan():
    candidates = plan_layouts(_profiles(2.0), bandwidth_Bps=1e9, **LAYOUT_DIMS)
    raced = race(candidates, [4, 1])
    assert list(raced) == ["local", "tp", "sp", "galaxy even", "galaxy x1", "galaxy x4"]
    assert raced["galaxy x4"] == dict(candidates["galaxy"][0], overlap_tiles=4)
    assert raced["galaxy even"]["tp_num_attention_heads_list"] == [8, 8]
    shaped = race(candidates, [4, [1, 7], 2, 1])  # fewer messages first, a count before a shape of as many
    assert list(shaped)[4:] == ["galaxy x1", "galaxy x2", "galaxy x[1, 7]", "galaxy x4"]
    assert shaped["galaxy x[1, 7]"]["overlap_tiles"] == [1, 7]


def test_tiles_on_the_command_line_are_counts_or_sizes():
    assert [parse_tiles(t) for t in ("4", "1,7", "1,2,4")] == [4, [1, 7], [1, 2, 4]]
    assert [tiles_name(t) for t in (4, [1, 7])] == ["4", "1,7"]
    with pytest.raises(ValueError, match="at least 1"):
        parse_tiles("0,3")
