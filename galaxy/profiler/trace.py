"""Per-rank timelines in Chrome's Trace Event Format, plus per-step comm bytes.

Each rank records complete events (``"ph": "X"``, ``ts``/``dur`` in microseconds)
with ``pid = rank`` and one thread lane per name ("compute", "comm", ...), and
saves them to its own JSON file; ``merge_traces`` joins the rank files into one
that chrome://tracing or https://ui.perfetto.dev shows as one process per rank.
Lanes are integer ``tid``s named by ``thread_name`` metadata events, as the
format specifies.

Tracing is off by default so library code can always write::

    from galaxy.profiler.trace import get_timeline
    with get_timeline().span("all_reduce", "comm", bytes=n):
        dist.all_reduce(t)
    get_timeline().comm.add(step, "all_reduce", n)

which costs one call and a flag test until an entry script calls
``enable_tracing(rank)``.  Call ``get_timeline()`` at the point of use rather than
caching its result at import time, which would keep the no-op timeline.  Spans measure host wall time: on GPU, code that wants
device time inside a span must synchronize before the span ends.
"""

import contextlib
import json
import os
import time
from collections import defaultdict

_NULL_SPAN = contextlib.nullcontext()  # reusable: entering it does nothing


class CommLog:
    """Bytes moved per training step, per collective kind ("all_reduce", "send", ...)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bytes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, step: int, kind: str, nbytes: int):
        if self.enabled:
            self._bytes[step][kind] += int(nbytes)

    def table(self, step: int) -> dict[str, int]:
        return dict(self._bytes.get(step, {}))

    def step_total(self, step: int) -> int:
        return sum(self._bytes.get(step, {}).values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        """JSON-ready copy (JSON object keys are strings)."""
        return {str(step): dict(kinds) for step, kinds in sorted(self._bytes.items())}


class Timeline:
    """Events of one rank.  ``enabled=False`` makes every method a no-op."""

    def __init__(self, rank: int = 0, enabled: bool = True):
        self.rank = rank
        self.enabled = enabled
        self.events: list[dict] = []
        self.comm = CommLog(enabled)
        self._lanes: dict[str, int] = {}
        # perf_counter is precise but has an arbitrary origin per process; anchoring it
        # to the wall clock once puts every rank's events on one shared time axis.
        self._epoch_offset = time.time() - time.perf_counter()

    def span(self, name: str, cat: str = "compute", lane: str | None = None, **args):
        """Context manager recording the enclosed block; lane defaults to ``cat``."""
        if not self.enabled:
            return _NULL_SPAN
        return self._span(name, cat, lane, args)

    @contextlib.contextmanager
    def _span(self, name, cat, lane, args):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, cat, start, time.perf_counter() - start, lane=lane, **args)

    def record(self, name: str, cat: str, start_s: float, dur_s: float,
               lane: str | None = None, **args):
        """Add an event that started at ``start_s`` (a ``time.perf_counter()`` reading)
        and lasted ``dur_s`` seconds; ``args`` (e.g. ``bytes=``) show in the viewer."""
        if not self.enabled:
            return
        event = {"name": name, "cat": cat, "ph": "X",
                 "ts": (start_s + self._epoch_offset) * 1e6, "dur": dur_s * 1e6,
                 "pid": self.rank, "tid": self._lanes.setdefault(lane or cat, len(self._lanes))}
        if args:
            event["args"] = args
        self.events.append(event)

    def save(self, path: str):
        """Write this rank's trace (creating the folder); comm bytes go in ``otherData``."""
        names = [("process_name", 0, f"rank {self.rank}")] + [("thread_name", t, n) for n, t in self._lanes.items()]
        metadata = [{"name": kind, "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}}
                    for kind, tid, name in names]
        _write_json(path, {"traceEvents": metadata + self.events, "displayTimeUnit": "ms",
                           "otherData": {"rank": self.rank, "comm_bytes": self.comm.to_dict()}})


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def merge_traces(paths, out_path: str) -> dict:
    """Concatenate rank trace files into ``out_path``; comm bytes are kept per rank."""
    events, comm = [], {}
    for path in paths:
        with open(path) as f:
            trace = json.load(f)
        events += trace["traceEvents"]
        other = trace.get("otherData", {})
        comm[str(other.get("rank", path))] = other.get("comm_bytes", {})
    merged = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"comm_bytes": comm}}
    _write_json(out_path, merged)
    return merged


_timeline = Timeline(enabled=False)


def enable_tracing(rank: int = 0) -> Timeline:
    """Start a fresh, recording timeline for this process and return it."""
    global _timeline
    _timeline = Timeline(rank, enabled=True)
    return _timeline


def disable_tracing():
    """Back to the no-op timeline (the recorded one is dropped; save it first)."""
    global _timeline
    _timeline = Timeline(enabled=False)


def get_timeline() -> Timeline:
    """The process-wide timeline: a no-op one unless ``enable_tracing`` was called."""
    return _timeline
