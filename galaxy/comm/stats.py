"""Counts what the collectives move, so benchmarks, --explain and traces can report bytes.

Off by default (a single `if` per collective). Every collective reports the tensor this rank
contributes (all-gather: its own slice; reduce-scatter / all-reduce: its whole input) and
whether it runs in the forward pass, in backward (the conjugate of a forward collective: the
autograd collectives' backward runs inside `phase(BWD)`), or for gradient synchronisation.
Listeners are called as listen(kind, nbytes, phase, start_s, dur_s).
"""
import time
from collections import Counter
from contextlib import contextmanager, nullcontext

FWD, BWD, GRAD = "fwd", "bwd", "grad"
_listeners = []
_OFF = nullcontext()
_phase = FWD  # what collectives run now are part of, unless they say otherwise


def label(kind, phase):
    """How traces and --explain name a collective: "all_gather", "reduce_scatter(bwd)", "all_reduce(grad)"."""
    return kind if phase == FWD else f"{kind}({phase})"


@contextmanager
def phase(name):
    """Tag the collectives run inside the block with `name` (BWD for the conjugates in backward)."""
    global _phase
    outer, _phase = _phase, name
    try:
        yield
    finally:
        _phase = outer


def record(kind, tensor, phase=None, start_s=None, dur_s=0.0):
    if _listeners:
        phase = phase or _phase
        nbytes = tensor.numel() * tensor.element_size()
        start_s = time.perf_counter() if start_s is None else start_s
        for listen in _listeners:
            listen(kind, nbytes, phase, start_s, dur_s)


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
def count_bytes(phases=(FWD, BWD, GRAD)):
    """Yield a Counter of bytes contributed per collective kind inside the block, counting the
    collectives of the given phases (default all: forward, backward and gradient sync)."""
    counts = Counter()

    def listen(kind, nbytes, phase, *_):
        if phase in phases:
            counts[kind] += nbytes

    with listening(listen):
        yield counts
