"""Pipeline schedules as data, then a small runner that executes them.

A schedule is the list of actions one stage performs, e.g. for stage 0 of 2 with 4
micro-batches under 1F1B:  F0 F1 B0 F2 B1 F3 B2 B3.  Lists can be printed, compared and
tested without processes. `run_schedule` executes a list by calling `forward_step(i)`
and `backward_step(i, saved)`; it knows nothing about data, loss or communication.

    GPipe: every forward, then every backward. All M micro-batches' activations are
           alive at once.
    1F1B:  warm-up forwards (num_stages - stage - 1), then alternate one forward and one
           backward, then the remaining backwards. A stage holds at most num_stages - stage
           micro-batches of activations, however large M is.
"""
from dataclasses import dataclass

FORWARD, BACKWARD = "F", "B"


def _check(num_stages, stage, num_microbatches):
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches {num_microbatches} must be at least 1")


def gpipe_actions(num_stages, stage, num_microbatches):
    _check(num_stages, stage, num_microbatches)
    return [(FORWARD, i) for i in range(num_microbatches)] + [(BACKWARD, i) for i in range(num_microbatches)]


def one_f_one_b_actions(num_stages, stage, num_microbatches):
    _check(num_stages, stage, num_microbatches)
    warmup = min(num_stages - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    actions = [(FORWARD, i) for i in range(warmup)]
    for i in range(steady):
        actions += [(FORWARD, warmup + i), (BACKWARD, i)]
    actions += [(BACKWARD, i) for i in range(steady, num_microbatches)]
    return actions


SCHEDULES = {"gpipe": gpipe_actions, "1f1b": one_f_one_b_actions}


def schedule_actions(name, num_stages, stage, num_microbatches):
    if name not in SCHEDULES:
        raise ValueError(f"pipeline_schedule '{name}' is not one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_stages, stage, num_microbatches)


def format_actions(actions):
    """'F0 F1 B0 ...': the compact form --explain and tests print."""
    return " ".join(f"{kind}{i}" for kind, i in actions)


@dataclass
class ScheduleStats:
    peak_live: int = 0  # most micro-batches whose forward state was held at once


def run_schedule(actions, forward_step, backward_step):
    """Run `actions` in order. forward_step(i) returns what backward_step(i, saved) needs
    (the micro-batch's activations); it is held, and counted, until that backward."""
    live, stats = {}, ScheduleStats()
    for kind, i in actions:
        if kind == FORWARD:
            if i in live:
                raise ValueError(f"micro-batch {i} is run forward twice")
            live[i] = forward_step(i)
            stats.peak_live = max(stats.peak_live, len(live))
        elif kind == BACKWARD:
            if i not in live:
                raise ValueError(f"micro-batch {i} is run backward before its forward")
            backward_step(i, live.pop(i))
        else:
            raise ValueError(f"unknown action {kind!r}")
    if live:
        raise ValueError(f"micro-batches {sorted(live)} were never run backward")
    return stats
