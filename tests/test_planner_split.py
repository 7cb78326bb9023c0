"""The planner's split logic (pure functions, no processes)."""
import pytest

from galaxy.planner.split import RankProfile, apportion, comm_seconds, even_galaxy, plan_galaxy, \
    predict_layer_seconds


def test_apportion_is_proportional_to_speed_and_exact():
    assert apportion(12, [1.0, 1.0]) == [6, 6]
    assert apportion(12, [1.0, 2.0]) == [8, 4]  # the 2x slower rank gets half the work
    assert max(n * c for n, c in zip(apportion(13, [1.0, 2.0, 4.0]), [1.0, 2.0, 4.0])) == 8
    assert sum(apportion(3072, [0.3, 0.7, 1.1], unit=64)) == 3072


def test_apportion_minimises_the_slowest_rank():
    costs = [1.0, 1.7, 2.9]
    best = max(n * c for n, c in zip(apportion(20, costs), costs))
    brute = min(max(a * costs[0], b * costs[1], (20 - a - b) * costs[2])
                for a in range(1, 19) for b in range(1, 20 - a))
    assert best == pytest.approx(brute)


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
    assert split["seq_scatter_list"][0] > split["seq_scatter_list"][1]
    even = even_galaxy(2, heads=12, intermediate=3072, seq=512)
    assert predicted < 12 * predict_layer_seconds(even, _profiles(2.0), 1, 768, 1.25e8)


def test_memory_budget_caps_a_rank():
    fast, slow = _profiles(1.0)
    tight = RankProfile(fast.att_s_per_head, fast.mlp_s_per_column, fast.con_s_per_position, memory_bytes=60e6)
    split, _ = plan_galaxy([tight, slow], hidden=768, heads=12, intermediate=3072, seq=512, layers=12, batch=1,
                           bandwidth_Bps=1e9)
    assert split["tp_num_attention_heads_list"][0] < 6 and split["tp_intermediate_size_list"][0] < 1536


def test_comm_model_counts_padding_of_uneven_shards():
    assert comm_seconds([512], 1, 768, 1e9) == 0.0
    assert comm_seconds([300, 212], 1, 768, 1e9) > comm_seconds([256, 256], 1, 768, 1e9)
