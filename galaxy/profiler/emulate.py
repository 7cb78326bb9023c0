"""Edge devices emulated by throughput: a rank stated to compute `gflops` fp32 GFLOP/s takes, for
every torch call that does arithmetic, that call's FLOPs / gflops (docs/emulation.md).

    with Throughput(10):          # this thread now computes like a 10 GFLOP/s device
        model(ids)

How: a TorchFunctionMode sees every torch.* / F.* / Tensor.* call. A call the FLOP rules of
galaxy.profiler.flops count (linear, matmul, SDPA, norms, activations, element-wise arithmetic)
runs at the host's speed, then the thread *sleeps* the rest of FLOPs / throughput. So

- calls that move bytes without arithmetic (copies, cat, slicing, views, the collectives, which
  are no torch functions) keep the host's speed: an emulated device computes slowly, it does not
  send slowly;
- waiting for a peer is not stretched: the host's time of a call is the time its thread ran
  (time.thread_time) or was ready to run but waited for a core (the kernel's schedstat run_delay,
  where the kernel keeps it), not the time it was blocked, e.g. a DTensor op waiting for its
  all-gather;
- a stretched or waiting rank holds no core (it sleeps), so several emulated devices share a few
  host cores as long as their throughputs sum to well below the cores' own (about 30 GFLOP/s
  per core of this machine in a single-threaded matmul);
- a call the host runs slower than the target (element-wise calls bound by memory bandwidth,
  a loaded host) takes its host time: the target is an upper bound per call.

A sleep overshoots by the scheduler's wake-up delay (~0.1 ms on an idle host, milliseconds on a
loaded one), so the time owed is kept as a balance: paid by sleeping once it reaches PAY_FROM,
an overshoot up to CREDIT taken off the following calls. Timing is thus right to about a
millisecond per block of calls, and a rank's sends leave at most PAY_FROM early.

Autograd's backward never reaches a TorchFunctionMode, so a TorchDispatchMode entered beside it
(`_Backward`) stretches the aten ops that autograd runs (torch._C._current_autograd_node() is set):
matrix products and attention by torch's own FLOP rules (torch.utils.flop_counter), the CPU's
fused attention backward as twice its forward's products. Element-wise backward ops run at the
host's speed (memory-bound; see docs/emulation.md).
"""
import contextlib
import importlib
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from galaxy.profiler.flops import call_flops, counts


PAY_FROM = 0.5e-3  # seconds owed before a sleep pays them
CREDIT = 5e-3      # seconds of a sleep's overshoot at most credited to the following calls


def check_gflops(values, world, flag="--device_gflops"):
    """Raise ValueError naming `flag` unless `values` are `world` positive throughputs."""
    if len(values) != world:
        raise ValueError(f"{flag} {list(values)}: {len(values)} throughputs for {world} ranks (one per rank)")
    if not all(v > 0 for v in values):
        raise ValueError(f"{flag} {list(values)}: a throughput is a number of GFLOP/s above 0")


class _HostClock:
    """Seconds the calling thread has run or waited for a core while runnable (blocked time, e.g.
    waiting for a peer, excluded): time.thread_time plus the kernel's run_delay of the thread
    (/proc/thread-self/schedstat; 0 where the kernel does not keep it)."""

    def __init__(self):
        self.thread = threading.get_ident()
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def __call__(self):
        waited = int(os.pread(self.fd, 64, 0).split()[1]) * 1e-9 if self.fd is not None else 0.0
        return time.thread_time() + waited

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


class Throughput(TorchFunctionMode):
    """This thread computes at `gflops` GFLOP/s while the mode is entered (module docstring).
    `flops` and `seconds` add up the counted calls (their FLOPs, their wall time), so
    `measured_gflops()` says what the emulation delivered."""

    def __init__(self, gflops):
        super().__init__()
        importlib.import_module("torch._dynamo")  # a dispatch mode's first op imports it (~2.5 s): not in a timed call
        self.flops, self.seconds, self._balance = 0, 0.0, 0.0
        self._clock = None
        self.set(gflops)

    def set(self, gflops):
        """Change the throughput from the next call on (a device that throttles)."""
        check_gflops([gflops], 1, "throughput")
        self.gflops = gflops

    def measured_gflops(self):
        return self.flops / self.seconds / 1e9 if self.seconds else float("nan")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not counts(func):
            return func(*args, **kwargs)
        return self.timed(lambda: func(*args, **kwargs), lambda out: call_flops(func, args, kwargs, out)[0])

    def timed(self, call, flops_of):
        """call()'s result, taking flops_of(result) / throughput seconds (or the host's time if longer)."""
        clock = self._host_clock()
        start, host = time.perf_counter(), clock()
        out = call()
        host_s = clock() - host
        flops = flops_of(out)
        self._sleep(flops / (self.gflops * 1e9) - host_s)
        self.flops += flops
        self.seconds += time.perf_counter() - start
        return out

    def __enter__(self):
        entered = super().__enter__()
        self._backward = _Backward(self).__enter__()
        return entered

    def _host_clock(self):
        """The clock of the thread calling (a mode is entered per thread; opened on its first call)."""
        if self._clock is None or self._clock.thread != threading.get_ident():
            if self._clock is not None:
                self._clock.close()
            self._clock = _HostClock()
        return self._clock

    def __exit__(self, *exc):
        if self._clock is not None:
            self._clock.close()
            self._clock = None
        try:
            self._backward.__exit__(*exc)
        finally:
            handled = super().__exit__(*exc)
        return handled

    def _sleep(self, owed):
        """Add `owed` seconds (none when the host was slower) to the balance and sleep it off once it
        reaches PAY_FROM; an overshoot, up to CREDIT, is taken off the next calls' time."""
        self._balance += max(owed, 0.0)
        if self._balance < PAY_FROM:
            return
        start = time.perf_counter()
        time.sleep(self._balance)
        self._balance = max(self._balance - (time.perf_counter() - start), -CREDIT)


def _fused_attention_backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
    """FLOPs of the CPU's fused attention backward: dQ, dK, dV and dP, twice the forward's products
    (2 FLOPs per MAC of the forward's rule)."""
    return 2 * 2 * call_flops(F.scaled_dot_product_attention, (query, key, value), {}, None)[1]


_BACKWARD_FLOPS = {**flop_registry,
                   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _fused_attention_backward}


class _Backward(TorchDispatchMode):
    """The backward half of a Throughput: aten ops run by autograd's engine (forward calls are the
    function mode's; a forward's aten ops are not counted twice)."""

    def __init__(self, throughput):
        super().__init__()
        self.throughput = throughput

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _BACKWARD_FLOPS.get(func._overloadpacket)
        if rule is None or torch._C._current_autograd_node() is None:
            return func(*args, **kwargs)
        return self.throughput.timed(lambda: func(*args, **kwargs), lambda out: rule(*args, **kwargs, out_val=out))


def parse_gflops(text):
    """'40,10' or '[40, 10]' -> [40.0, 10.0] (a command line's per-rank throughputs)."""
    try:
        values = [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{text!r}: expected GFLOP/s per rank, e.g. 40,10")
    return values


def parse_change(text):
    """'STEP:40,5' -> (STEP, [40.0, 5.0]): the throughputs from after step (or request) STEP on."""
    step, sep, values = text.partition(":")
    if not sep or not step.strip().isdigit() or int(step) < 1:
        raise ValueError(f"{text!r}: expected STEP:GFLOPS,... with STEP >= 1, e.g. 20:40,5")
    return int(step), parse_gflops(values)


def check_devices(gflops, changes, world):
    """Raise ValueError naming the flag unless the throughputs (and each change) give every rank one."""
    if changes and gflops is None:
        raise ValueError("--device_gflops_after changes the throughputs --device_gflops sets: give both")
    if gflops is not None:
        check_gflops(gflops, world)
    for step, values in changes:
        check_gflops(values, world, f"--device_gflops_after {step}:")
    steps = [step for step, _ in changes]
    if len(set(steps)) < len(steps):
        raise ValueError(f"--device_gflops_after: step {max(steps, key=steps.count)} is given twice")


class Device(Throughput):
    """This rank's emulated device over a run (entry scripts' --device_gflops): enter it around the
    steps; call `after_step(step)` at each step boundary to apply --device_gflops_after's changes."""

    def __init__(self, gflops, changes, rank, log=None, unit="step"):
        super().__init__(gflops[rank])
        self.changes, self.rank, self.unit = dict(changes), rank, unit
        self.log = log or (lambda line: None)
        self.log(f"emulated devices: {gflops} GFLOP/s per rank" + "".join(
            f"; after {unit} {step}: {values}" for step, values in sorted(self.changes.items())))

    def after_step(self, step):
        if step in self.changes:
            self.log(f"after {self.unit} {step}: emulated devices now {self.changes[step]} GFLOP/s per rank "
                     f"(measured so far on rank {self.rank}: {self.measured_gflops():.1f})")
            self.set(self.changes[step][self.rank])


class NoDevice(contextlib.nullcontext):
    """The host as it is (no --device_gflops)."""

    def __enter__(self):
        return self

    def after_step(self, step):
        pass


def device(gflops, changes, rank, log=None, unit="step"):
    """Device(...) when throughputs are given, else NoDevice()."""
    return NoDevice() if gflops is None else Device(gflops, changes, rank, log, unit)
