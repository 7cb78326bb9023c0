"""How long each rank waited in each collective, from --trace_dir's traces (issue 23: what overlap hides).

    sudo python -m benchmarks.netem --rate 1gbit --run "python pretrain_galaxy.py ... --trace_dir traces"
    python -m benchmarks.trace_waits traces [more trace dirs ...] --link_MBps 118

A span of the comm lane is the time its rank was blocked in the collective (for a tile of
overlap_tiles, only the wait after its compute: galaxy.comm.overlap). A wait is the link's time
for what compute did not hide plus any time the peer was still computing (an imbalance of the
split), so the rank that waits less shows the exposed link time best. Per rank and collective:
the mean over the steps after the first (which warms up) of the waits, spans and bytes the trace
records (an all-gather's slice, a reduce-scatter's or all-reduce's whole input), beside the time
at --link_MBps of what the rank sends for them (ring volumes: RING_FACTOR).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.common import RING_FACTOR, table


def waits(trace_file):
    """{collective: (waited ms, spans, bytes)} per step, averaged over steps 2..n; and the steps' ms."""
    events = json.loads(Path(trace_file).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    steps = [e["dur"] / 1e3 for e in spans if e["cat"] == "step"][1:]
    total = defaultdict(lambda: [0.0, 0, 0])
    for e in spans:
        if e["cat"] == "comm" and e["args"]["step"] >= 2:
            row = total[e["name"]]
            row[0], row[1], row[2] = row[0] + e["dur"] / 1e3, row[1] + 1, row[2] + e["args"]["bytes"]
    n = max(1, len(steps))
    return {name: (ms / n, spans // n, nbytes / n) for name, (ms, spans, nbytes) in sorted(total.items())}, steps


def sent(name, nbytes, world):
    """Bytes a rank sends for a collective the trace recorded with `nbytes` (its slice for an
    all-gather, its whole input otherwise)."""
    return nbytes * RING_FACTOR[name.split("(")[0]](world)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dirs", nargs="+")
    p.add_argument("--link_MBps", type=float, default=118.0, help="the link's measured rate, MB/s")
    args = p.parse_args(argv)
    for directory in args.trace_dirs:
        traces = sorted(Path(directory).glob("trace_rank*.json"))
        for trace in traces:
            per_kind, steps = waits(trace)
            print(f"\n{trace}: steps after the first {', '.join(f'{s:.0f}' for s in steps)} ms")
            print(table([[name, f"{ms:.1f}", spans, f"{nbytes / 1e6:.2f}",
                          f"{sent(name, nbytes, len(traces)) / 1e3 / args.link_MBps:.1f}"]
                         for name, (ms, spans, nbytes) in per_kind.items()],
                        ["collective", "waited ms/step", "spans/step", "MB/step", "sent's link ms"]))


if __name__ == "__main__":
    main()
