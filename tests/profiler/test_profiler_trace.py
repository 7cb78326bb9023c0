import json
import time

from galaxy.profiler import trace
from galaxy.profiler.trace import CommLog, Timeline, merge_traces


def test_span_and_record_write_chrome_trace(tmp_path):
    tl = Timeline(rank=3)
    with tl.span("fwd", "compute", micro=0):
        time.sleep(0.001)
    start = time.perf_counter()
    tl.record("all_reduce", "comm", start, 0.002, bytes=4096)
    path = tmp_path / "sub" / "rank3.json"  # folder does not exist yet
    tl.save(str(path))

    with open(path) as f:
        data = json.load(f)
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in events] == ["fwd", "all_reduce"]
    for e in events:
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
        assert e["pid"] == 3
    fwd, comm = events
    assert fwd["dur"] >= 1000 and fwd["args"] == {"micro": 0}  # microseconds
    assert comm["dur"] == 2000 and comm["args"]["bytes"] == 4096
    assert fwd["tid"] != comm["tid"]
    lanes = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert lanes == {fwd["tid"]: "compute", comm["tid"]: "comm"}
    # Both events sit on the shared wall-clock axis (microseconds since the epoch).
    assert abs(comm["ts"] / 1e6 - time.time()) < 60


def test_merge_keeps_both_ranks(tmp_path):
    paths = []
    for rank in (0, 1):
        tl = Timeline(rank)
        with tl.span(f"step-r{rank}", "compute"):
            pass
        tl.comm.add(0, "all_reduce", 100 * (rank + 1))
        paths.append(str(tmp_path / f"rank{rank}.json"))
        tl.save(paths[-1])
    merge_traces(paths, str(tmp_path / "merged.json"))
    with open(tmp_path / "merged.json") as f:
        merged = json.load(f)
    spans = {(e["pid"], e["name"]) for e in merged["traceEvents"] if e["ph"] == "X"}
    assert spans == {(0, "step-r0"), (1, "step-r1")}
    assert merged["otherData"]["comm_bytes"] == {"0": {"0": {"all_reduce": 100}},
                                                 "1": {"0": {"all_reduce": 200}}}


def test_comm_log_tables():
    log = CommLog()
    log.add(0, "all_reduce", 10)
    log.add(0, "all_reduce", 5)
    log.add(0, "send", 7)
    log.add(1, "all_gather", 3)
    assert log.table(0) == {"all_reduce": 15, "send": 7}
    assert log.step_total(0) == 22 and log.step_total(1) == 3
    assert log.table(2) == {} and log.step_total(2) == 0


def test_global_timeline_is_noop_until_enabled():
    try:
        off = trace.get_timeline()
        with off.span("x", "compute"):
            pass
        off.record("y", "comm", 0.0, 1.0)
        off.comm.add(0, "send", 1)
        assert off.events == [] and off.comm.step_total(0) == 0

        on = trace.enable_tracing(rank=2)
        assert trace.get_timeline() is on and on.rank == 2
        with trace.get_timeline().span("x", "compute"):
            pass
        assert len(on.events) == 1
    finally:
        trace.disable_tracing()
    assert not trace.get_timeline().enabled
