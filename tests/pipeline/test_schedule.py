"""Schedules as data: the action lists, and the runner's bookkeeping, without processes."""
import pytest

from galaxy.pipeline.schedule import (format_actions, gpipe_actions, one_f_one_b_actions, run_schedule,
                                      schedule_actions)


def test_gpipe_is_all_forwards_then_all_backwards():
    assert format_actions(gpipe_actions(3, 1, 4)) == "F0 F1 F2 F3 B0 B1 B2 B3"


def test_one_f_one_b_warmup_steady_cooldown():
    assert format_actions(one_f_one_b_actions(2, 0, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert format_actions(one_f_one_b_actions(2, 1, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3"
    assert format_actions(one_f_one_b_actions(3, 0, 4)) == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert format_actions(one_f_one_b_actions(3, 1, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert format_actions(one_f_one_b_actions(3, 2, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3"


def test_one_f_one_b_with_fewer_microbatches_than_stages():
    assert format_actions(one_f_one_b_actions(4, 0, 2)) == "F0 F1 B0 B1"


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(2, 4), (3, 4), (4, 8), (3, 1)])
def test_every_microbatch_once_forward_before_backward(name, stages, microbatches):
    for stage in range(stages):
        actions = schedule_actions(name, stages, stage, microbatches)
        assert sorted(actions) == sorted([(k, i) for k in "FB" for i in range(microbatches)])
        assert all(actions.index(("F", i)) < actions.index(("B", i)) for i in range(microbatches))
        # backwards in micro-batch order: the pipeline's receives match sends in FIFO order
        assert [i for k, i in actions if k == "B"] == list(range(microbatches))


def _peak(actions):
    return run_schedule(actions, lambda i: f"activations {i}", lambda i, saved: None).peak_live


def test_runner_counts_live_activations():
    assert [_peak(one_f_one_b_actions(4, s, 8)) for s in range(4)] == [4, 3, 2, 1]
    assert [_peak(gpipe_actions(4, s, 8)) for s in range(4)] == [8, 8, 8, 8]


def test_runner_passes_each_forward_result_to_its_backward():
    seen = []
    run_schedule(one_f_one_b_actions(2, 0, 3), lambda i: i * 10, lambda i, saved: seen.append((i, saved)))
    assert seen == [(0, 0), (1, 10), (2, 20)]


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="pipeline_schedule 'zb'"):
        schedule_actions("zb", 2, 0, 4)
    with pytest.raises(ValueError, match="stage 2 is outside"):
        gpipe_actions(2, 2, 4)
    with pytest.raises(ValueError, match="backward before its forward"):
        run_schedule([("B", 0)], None, None)
    with pytest.raises(ValueError, match="never run backward"):
        run_schedule([("F", 0)], lambda i: i, None)
