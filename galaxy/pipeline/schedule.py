"""Pipeline schedules as data, then a small runner that executes them.

A schedule is the list of actions one rank performs, e.g. for rank 0 of 2 with 4
micro-batches under 1F1B:  F0 F1 B0 F2 B1 F3 B2 B3.  Lists can be printed, compared,
simulated (`simulate`: a predicted bubble fraction) and tested without processes.
`run_schedule` executes a list by calling `forward_step(action)`, `backward_step(action, saved)`
and `weight_step(action, saved)`; it knows nothing about data, loss or communication.

    GPipe: every forward, then every backward. All M micro-batches' activations are
           alive at once.
    1F1B:  warm-up forwards (num_stages - stage - 1), then alternate one forward and one
           backward, then the remaining backwards. A stage holds at most num_stages - stage
           micro-batches of activations, however large M is.
    interleaved 1F1B (Megatron): each rank holds V chunks; chunk c of rank r is model stage
           c * S + r. The same three loops, over M * V (micro-batch, chunk) pairs taken S
           micro-batches at a time, chunk by chunk: F0.0 F1.0 F0.1 F1.1 ... (Fi.c = micro-batch
           i, chunk c). A longer warm-up, a bubble V times smaller.
    ZB-H1 (zero bubble, Qi et al. 2023): 1F1B whose backward is split into B (the input's
           gradient, which the previous stage waits for) and W (the weights' gradients, which
           nobody waits for). Stage s starts its W's s steps late (a later stage has a shorter
           warm-up), and the deferred W's fill the cool-down's gaps: the bubble of S - 1 unit
           actions, against 1F1B's 3 (S - 1) (F = B = W = 1).
"""
from collections import namedtuple
from dataclasses import dataclass

# B alone is the whole backward; when a W follows, B is the input's gradient and W the weights'
FORWARD, BACKWARD, WEIGHT = "F", "B", "W"


class Action(namedtuple("Action", "kind microbatch chunk", defaults=(0,))):
    def __str__(self):
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def _check(num_stages, stage, num_microbatches):
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches {num_microbatches} must be at least 1")


def gpipe_actions(num_stages, stage, num_microbatches):
    _check(num_stages, stage, num_microbatches)
    return [Action(k, i) for k in (FORWARD, BACKWARD) for i in range(num_microbatches)]


def one_f_one_b_actions(num_stages, stage, num_microbatches):
    _check(num_stages, stage, num_microbatches)
    warmup = min(num_stages - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    actions = [Action(FORWARD, i) for i in range(warmup)]
    for i in range(steady):
        actions += [Action(FORWARD, warmup + i), Action(BACKWARD, i)]
    actions += [Action(BACKWARD, i) for i in range(steady, num_microbatches)]
    return actions


def _interleaved_order(k, num_stages, chunks, reverse):
    """(micro-batch, chunk) of a rank's k-th forward (or backward: chunks in reverse)."""
    group, pos = divmod(k, num_stages * chunks)
    chunk = pos // num_stages
    return group * num_stages + pos % num_stages, chunks - 1 - chunk if reverse else chunk


def interleaved_actions(num_stages, stage, num_microbatches, chunks):
    _check(num_stages, stage, num_microbatches)
    if num_microbatches % num_stages:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({num_microbatches}) a multiple of the "
                         f"{num_stages} pipeline ranks")
    total = num_microbatches * chunks
    warmup = min(2 * (num_stages - stage - 1) + (chunks - 1) * num_stages, total)
    fwd = [Action(FORWARD, *_interleaved_order(k, num_stages, chunks, False)) for k in range(total)]
    bwd = [Action(BACKWARD, *_interleaved_order(k, num_stages, chunks, True)) for k in range(total)]
    actions = fwd[:warmup]
    for k in range(total - warmup):
        actions += [fwd[warmup + k], bwd[k]]
    return actions + bwd[total - warmup:]


def zb_h1_actions(num_stages, stage, num_microbatches):
    _check(num_stages, stage, num_microbatches)
    warmup = min(num_stages - stage - 1, num_microbatches)
    deferred = iter(Action(WEIGHT, i) for i in range(num_microbatches))
    actions = [Action(FORWARD, i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        actions += [Action(FORWARD, warmup + i), Action(BACKWARD, i)]
        actions += [next(deferred)] if i >= stage else []
    for i in range(num_microbatches - warmup, num_microbatches):
        actions += [Action(BACKWARD, i), next(deferred)]
    return actions + list(deferred)


SCHEDULES = {"gpipe": gpipe_actions, "1f1b": one_f_one_b_actions, "zb-h1": zb_h1_actions,
             "interleaved-1f1b": interleaved_actions}


def schedule_actions(name, num_stages, stage, num_microbatches, chunks=1):
    """The action list of `stage` (a rank of the pipeline); only interleaved-1f1b takes chunks > 1."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline_schedule '{name}' is not one of {sorted(SCHEDULES)}")
    if name == "interleaved-1f1b":
        return interleaved_actions(num_stages, stage, num_microbatches, chunks)
    if chunks != 1:
        raise ValueError(f"pipeline_schedule '{name}' runs one chunk per rank, not virtual_stages {chunks}")
    return SCHEDULES[name](num_stages, stage, num_microbatches)


def format_actions(actions):
    """'F0 F1 B0 ...' (Fi.c for chunk c > 0): the compact form --explain and tests print."""
    return " ".join(str(a) for a in actions)


def simulate(per_rank, chunks=1):
    """Run every rank's list with unit-time actions (each chunk 1/chunks of a stage's work; a B
    with no W after it is the whole backward, B + W) and no link delay. An action starts once
    its rank is free and its input is ready: F after the previous model stage's F, B after the
    next one's B. Returns (finish time, bubble fraction = idle / (ranks x finish time)); raises
    if the lists deadlock."""
    ranks, done, free, busy = len(per_rank), {}, [0.0] * len(per_rank), [0.0] * len(per_rank)
    last = ranks * chunks - 1
    split = [any(a.kind == WEIGHT for a in actions) for actions in per_rank]
    queues = [list(actions) for actions in per_rank]
    while any(queues):
        progressed = False
        for r, queue in enumerate(queues):
            while queue:
                a, stage = queue[0], queue[0].chunk * ranks + r
                need = {FORWARD: (FORWARD, stage - 1) if stage > 0 else None,
                        BACKWARD: (BACKWARD, stage + 1) if stage < last else None,
                        WEIGHT: (BACKWARD, stage)}[a.kind]
                ready = done.get((need[0], a.microbatch, need[1]), None) if need else 0.0
                if ready is None:
                    break
                t = 2.0 if a.kind == BACKWARD and not split[r] else 1.0
                free[r] = max(free[r], ready) + t / chunks
                busy[r] += t / chunks
                done[(a.kind, a.microbatch, stage)] = free[r]
                queue.pop(0)
                progressed = True
        if not progressed:
            raise ValueError(f"schedule deadlocks: ranks wait at {[format_actions(q[:1]) for q in queues]}")
    end = max(free)
    return end, 1 - sum(busy) / (ranks * end)


@dataclass
class ScheduleStats:
    peak_live: int = 0  # most micro-batches (chunks) whose forward state was held at once


def run_schedule(actions, forward_step, backward_step, weight_step=None):
    """Run `actions` in order. forward_step(a) returns what backward_step(a, saved) needs (the
    micro-batch's activations); it is held, and counted, until that backward, or, when a W for
    the same micro-batch and chunk follows, until weight_step(a, saved)."""
    live, backed, stats = {}, set(), ScheduleStats()
    weighted = {a[1:] for a in actions if a.kind == WEIGHT}
    for a in actions:
        key = a[1:]
        if a.kind == FORWARD:
            if key in live or key in backed:
                raise ValueError(f"{a} is run forward twice")
            live[key] = forward_step(a)
            stats.peak_live = max(stats.peak_live, len(live))
        elif a.kind == BACKWARD:
            if key not in live or key in backed:
                raise ValueError(f"{a} is run backward before its forward (or twice)")
            backed.add(key)
            backward_step(a, live[key] if key in weighted else live.pop(key))
        elif a.kind == WEIGHT:
            if key not in backed or key not in live:
                raise ValueError(f"{a}: weight gradients before the input's (or twice)")
            weight_step(a, live.pop(key))
        else:
            raise ValueError(f"unknown action {a.kind!r}")
    if live:
        raise ValueError(f"micro-batches {sorted(live)} were never run backward")
    return stats
