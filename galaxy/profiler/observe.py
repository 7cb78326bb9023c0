"""A training run's communication view (pretrain_galaxy.py --trace_dir DIR).

Per rank, a Chrome trace (open in chrome://tracing or ui.perfetto.dev) with
  * lane "compute": one span per transformer layer's forward and one per its backward;
  * lane "comm": every collective, named like --explain names it ("all_gather",
    "reduce_scatter(bwd)" for the conjugate run in backward), args {bytes, phase, step}; a tile's
    collective (overlap_tiles) spans only the time compute waited for it, the part not hidden;
  * lane "grad sync": gradient all-reduce buckets, from launch until their wait returns
    (they overlap backward, so they get their own lane);
  * lane "step": one span per optimizer step;
and a per-step table of bytes per collective kind (the trace's otherData.comm_bytes too).
Bytes are what this rank contributes: its slice for an all-gather, its whole input otherwise.
"""
import time
from contextlib import contextmanager
from functools import partial

from galaxy.comm import stats
from galaxy.layers.transformer import TransformerLayer
from galaxy.profiler.trace import disable_tracing, enable_tracing


def _span_hooks(timeline, module, name):
    """Forward and backward spans of `module` in the compute lane; returns the hook handles."""
    starts = {}

    def begin(key, *_):
        starts[key] = time.perf_counter()

    def end(key, *_):
        start = starts.pop(key, None)
        if start is not None:
            timeline.record(f"{name} {key}", "compute", start, time.perf_counter() - start)

    return [module.register_forward_pre_hook(partial(begin, "fwd")), module.register_forward_hook(partial(end, "fwd")),
            module.register_full_backward_pre_hook(partial(begin, "bwd")),
            module.register_full_backward_hook(partial(end, "bwd"))]


@contextmanager
def traced(trace_dir, rank, model, current_step):
    """Record the block's layers and collectives; on exit save DIR/trace_rank{rank}.json and
    print this rank's bytes-per-step table. `current_step()` numbers the steps (1 = first).
    Yields the on_step callback for run_training (None when trace_dir is None: nothing is traced)."""
    if trace_dir is None:
        yield None
        return
    timeline = enable_tracing(rank)
    handles = [h for name, m in model.named_modules() if isinstance(m, TransformerLayer)
               for h in _span_hooks(timeline, m, f"layer {name.rsplit('.', 1)[-1]}")]

    def listen(kind, nbytes, phase, start_s, dur_s, *_):  # every collective, in the comm or grad sync lane
        name = stats.label(kind, phase)
        lane = "grad sync" if phase == stats.GRAD else "comm"
        timeline.record(name, "comm", start_s, dur_s, lane=lane, bytes=nbytes, phase=phase, step=current_step())
        timeline.comm.add(current_step(), name, nbytes)

    def step_span(metrics):  # the step that just ended (an optimizer step, or a request), in the "step" lane
        dur = metrics["step_time_s"]
        timeline.record(f"step {metrics['step']}", "step", time.perf_counter() - dur, dur)

    try:
        with stats.listening(listen):
            yield step_span
    finally:
        for h in handles:
            h.remove()
        disable_tracing()
    timeline.save(f"{trace_dir}/trace_rank{rank}.json")
    print(f"[rank {rank}] trace: {trace_dir}/trace_rank{rank}.json\n{comm_table(timeline.comm)}", flush=True)


def comm_table(comm):
    """Bytes per step and collective kind (MiB), one row per step."""
    steps = comm.to_dict()
    kinds = sorted({k for row in steps.values() for k in row})
    lines = [f"{'step':>5} " + " ".join(f"{k:>20}" for k in kinds) + f" {'total MiB':>10}"]
    lines += [f"{step:>5} " + " ".join(f"{row.get(k, 0) / 2**20:>20.3f}" for k in kinds)
              + f" {sum(row.values()) / 2**20:>10.3f}" for step, row in steps.items()]
    return "\n".join(lines)
