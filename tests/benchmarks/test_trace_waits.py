"""benchmarks/trace_waits.py reads --trace_dir's files: waits per collective and step, steps after the first."""
import json

from benchmarks import trace_waits


def _span(name, cat, dur_us, **args):
    return {"name": name, "cat": cat, "ph": "X", "ts": 0.0, "dur": dur_us, "pid": 0, "tid": 0, "args": args}


def test_waits_average_the_steps_after_the_first(tmp_path, capsys):
    events = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}}]
    for step in (1, 2, 3):
        events += [_span(f"step {step}", "step", 1000.0 * step),
                   _span("all_gather", "comm", 2000.0 * step, bytes=1000, phase="fwd", step=step),
                   _span("all_gather", "comm", 500.0, bytes=3000, phase="fwd", step=step),
                   _span("reduce_scatter(bwd)", "comm", 100.0, bytes=8000, phase="bwd", step=step)]
    for rank in (0, 1):
        (tmp_path / f"trace_rank{rank}.json").write_text(json.dumps({"traceEvents": events}))
    per_kind, steps = trace_waits.waits(tmp_path / "trace_rank0.json")
    assert steps == [2.0, 3.0]  # the first step warms up; all_gather waits 4.5 ms in step 2, 6.5 in step 3
    assert per_kind == {"all_gather": (5.5, 2, 4000.0), "reduce_scatter(bwd)": (0.1, 1, 8000.0)}
    assert trace_waits.sent("all_gather", 4000, 2) == 4000 and trace_waits.sent("reduce_scatter(bwd)", 8000, 2) == 4000
    trace_waits.main([str(tmp_path), "--link_MBps", "1"])
    out = capsys.readouterr().out
    assert out.count("waited ms/step") == 2 and "steps after the first 2, 3 ms" in out
