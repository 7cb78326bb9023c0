"""Schedules as data: the action lists, and the runner's bookkeeping, without processes."""
import pytest

from galaxy.pipeline.schedule import (Action, format_actions, gpipe_actions, interleaved_actions,
                                      one_f_one_b_actions, run_schedule, schedule_actions, simulate, zb_h1_actions)


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


def test_zb_h1_splits_the_backward_and_defers_weights_by_stage():
    assert format_actions(zb_h1_actions(2, 0, 4)) == "F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3"
    assert format_actions(zb_h1_actions(2, 1, 4)) == "F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3"


def test_interleaved_takes_chunks_stage_by_stage():
    assert format_actions(interleaved_actions(2, 0, 4, 2)) == \
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3"
    assert format_actions(interleaved_actions(2, 1, 4, 2)) == \
        "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3"
    with pytest.raises(ValueError, match="multiple of the 2 pipeline ranks"):
        interleaved_actions(2, 0, 3, 2)


CASES = [("gpipe", 1, 2, 4), ("1f1b", 1, 3, 4), ("1f1b", 1, 4, 8), ("1f1b", 1, 3, 1), ("zb-h1", 1, 2, 4),
         ("zb-h1", 1, 3, 6), ("zb-h1", 1, 4, 8), ("zb-h1", 1, 3, 1), ("interleaved-1f1b", 2, 2, 4),
         ("interleaved-1f1b", 2, 3, 6), ("interleaved-1f1b", 3, 4, 8), ("interleaved-1f1b", 1, 3, 3)]


@pytest.mark.parametrize("name,chunks,stages,microbatches", CASES)
def test_every_microbatch_once_forward_before_backward_before_weights(name, chunks, stages, microbatches):
    lists = [schedule_actions(name, stages, stage, microbatches, chunks) for stage in range(stages)]
    for actions in lists:
        kinds = "FBW" if name == "zb-h1" else "FB"
        assert sorted(actions) == sorted(Action(k, i, c) for k in kinds for i in range(microbatches)
                                         for c in range(chunks))
        for key in {a[1:] for a in actions}:
            assert [a.kind for a in actions if a[1:] == key] == list(kinds)
        # per chunk, backwards in micro-batch order: receives match sends in FIFO order
        for c in range(chunks):
            assert [a.microbatch for a in actions if a.kind == "B" and a.chunk == c] == list(range(microbatches))
    simulate(lists, chunks)  # raises if a rank waits for an action that never comes
    _check_fifo(lists, chunks)


def _check_fifo(lists, chunks):
    """Each link is one FIFO per direction: the order a rank receives in (its actions' order,
    receives posted in turn) is the order its neighbour sends in."""
    S, last = len(lists), len(lists) * chunks - 1

    def stages(r, kind, skip):  # (micro-batch, model stage) of rank r's actions of `kind`, bar stage `skip`
        return [(a.microbatch, a.chunk * S + r) for a in lists[r] if a.kind == kind and a.chunk * S + r != skip]
    for r in range(S):
        assert stages(r, "F", 0) == [(i, m + 1) for i, m in stages((r - 1) % S, "F", last)]
        assert stages(r, "B", last) == [(i, m - 1) for i, m in stages((r + 1) % S, "B", 0)]


def _bubble(name, stages, microbatches, chunks=1):
    return simulate([schedule_actions(name, stages, s, microbatches, chunks) for s in range(stages)], chunks)


def test_predicted_bubbles():
    """Unit-time F, B, W (a whole backward is B + W); S ranks, M micro-batches, V chunks."""
    S, M = 4, 8
    assert _bubble("1f1b", S, M) == (3 * (M + S - 1), pytest.approx((S - 1) / (M + S - 1)))
    assert _bubble("gpipe", S, M) == _bubble("1f1b", S, M)
    assert _bubble("zb-h1", S, M) == (3 * M + S - 1, pytest.approx((S - 1) / (3 * M + S - 1)))
    end, bubble = _bubble("interleaved-1f1b", S, M, chunks=2)
    assert bubble == pytest.approx(1 - 3 * M / end) and bubble < _bubble("1f1b", S, M)[1]


def test_a_deadlocking_schedule_is_caught():
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([[Action("F", 0), Action("B", 1), Action("F", 1), Action("B", 0)],
                  [Action("F", 1), Action("B", 1), Action("F", 0), Action("B", 0)]])


def _peak(actions):
    return run_schedule(actions, lambda a: f"activations {a}", lambda a, saved: None, lambda a, saved: None).peak_live


def test_runner_counts_live_activations():
    assert [_peak(one_f_one_b_actions(4, s, 8)) for s in range(4)] == [4, 3, 2, 1]
    assert [_peak(gpipe_actions(4, s, 8)) for s in range(4)] == [8, 8, 8, 8]
    assert [_peak(zb_h1_actions(4, s, 8)) for s in range(4)] == [4, 4, 4, 4]  # a W frees, not a B


def test_runner_passes_each_forward_result_to_its_backward():
    seen = []
    run_schedule(zb_h1_actions(2, 0, 3), lambda a: a.microbatch * 10, lambda a, saved: seen.append((str(a), saved)),
                 lambda a, saved: seen.append((str(a), saved)))
    assert seen == [("B0", 0), ("W0", 0), ("B1", 10), ("W1", 10), ("B2", 20), ("W2", 20)]


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="pipeline_schedule 'zb'"):
        schedule_actions("zb", 2, 0, 4)
    with pytest.raises(ValueError, match="stage 2 is outside"):
        gpipe_actions(2, 2, 4)
    with pytest.raises(ValueError, match="backward before its forward"):
        run_schedule([Action("B", 0)], None, None)
    with pytest.raises(ValueError, match="weight gradients before"):
        run_schedule([Action("F", 0), Action("W", 0)], lambda a: a, None)
    with pytest.raises(ValueError, match="never run backward"):
        run_schedule([Action("F", 0)], lambda a: a, None)
    with pytest.raises(ValueError, match="one chunk per rank"):
        schedule_actions("1f1b", 2, 0, 4, chunks=2)
