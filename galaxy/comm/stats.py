"""Counts what the collectives move, so benchmarks, --explain and traces can report bytes.

Off by default (a single `if` per collective). `record` is called by every collective with
the tensor this rank contributes; listeners turn that into bytes per kind per step.
"""
from collections import Counter
from contextlib import contextmanager

_listeners = []


def record(kind, tensor):
    if _listeners:
        nbytes = tensor.numel() * tensor.element_size()
        for listen in _listeners:
            listen(kind, nbytes)


@contextmanager
def count_bytes():
    """Yield a Counter of bytes contributed per collective kind inside the block."""
    counts = Counter()

    def listen(kind, nbytes):
        counts[kind] += nbytes

    _listeners.append(listen)
    try:
        yield counts
    finally:
        _listeners.remove(listen)
