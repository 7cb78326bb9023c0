"""FLOPs/latency profiling of modules and per-rank Chrome-trace timelines."""

from .flops import FlopsProfiler, get_model_profile
from .trace import CommLog, Timeline, disable_tracing, enable_tracing, get_timeline, merge_traces

__all__ = ["FlopsProfiler", "get_model_profile", "CommLog", "Timeline", "disable_tracing",
           "enable_tracing", "get_timeline", "merge_traces"]
