"""Counts what the collectives move, so benchmarks, --explain and traces can report bytes.

Off by default (a single `if` per collective). Every collective reports the tensor this rank
contributes (all-gather: its own slice; reduce-scatter / all-reduce: its whole input) and
whether it runs in the forward pass, in backward (whatever runs inside autograd's backward:
the conjugates, the tiled overlap's gathers, recomputed checkpointed layers), for gradient
synchronisation or in the optimizer step (ZeRO's gathers of updated shards; the caller says
which of these two), and at which site (the `site` labels open around it).
Listeners are called as listen(kind, nbytes, phase, start_s, dur_s, shape, site).
"""
import time
from collections import Counter
from contextlib import contextmanager, nullcontext

import torch

FWD, BWD, GRAD, STEP = "fwd", "bwd", "grad", "step"
_listeners = []
_OFF = nullcontext()
_sites = []  # labels of the code running now, outermost first (see site())


def label(kind, phase):
    """How traces and --explain name a collective: "all_gather", "reduce_scatter(bwd)", "all_reduce(grad)"."""
    return kind if phase == FWD else f"{kind}({phase})"


def current_phase():
    """BWD inside autograd's backward (by construction: the engine knows), else FWD."""
    return BWD if torch._C._current_graph_task_id() != -1 else FWD


@contextmanager
def site(name):
    """Label the collectives run inside the block ("Attention in"); nested labels join with " / "."""
    _sites.append(name)
    try:
        yield
    finally:
        _sites.pop()


def record(kind, tensor, phase=None, start_s=None, dur_s=0.0):
    if _listeners:
        phase = phase or current_phase()
        nbytes = tensor.numel() * tensor.element_size()
        start_s = time.perf_counter() if start_s is None else start_s
        for listen in _listeners:
            listen(kind, nbytes, phase, start_s, dur_s, tuple(tensor.shape), " / ".join(_sites))


def timed(kind, tensor):
    """Wrap one collective call: records it with its duration (a no-op when nobody listens)."""
    return _timed(kind, tensor) if _listeners else _OFF


@contextmanager
def _timed(kind, tensor):
    start = time.perf_counter()
    yield
    record(kind, tensor, None, start, time.perf_counter() - start)


@contextmanager
def listening(listen):
    """Call `listen` for every collective run inside the block."""
    _listeners.append(listen)
    try:
        yield listen
    finally:
        _listeners.remove(listen)


@contextmanager
def count_bytes(phases=(FWD, BWD, GRAD, STEP)):
    """Yield a Counter of bytes contributed per collective kind inside the block, counting the
    collectives of the given phases (default all: forward, backward, gradient sync, optimizer step)."""
    counts = Counter()

    def listen(kind, nbytes, phase, *_):
        if phase in phases:
            counts[kind] += nbytes

    with listening(listen):
        yield counts
