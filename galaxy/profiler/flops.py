"""Forward FLOPs / MACs / parameter / latency profiler for nn.Modules.

Counting works at the torch-function level: a ``TorchFunctionMode`` sees every
``torch.*`` / ``F.*`` / ``Tensor.*`` call while profiling is on, looks the
function up in a small rule table and charges the result to every module on a
module stack kept by forward pre/post hooks.  Counting at this level (rather
than at aten level) keeps the numbers independent of the backend: SDPA is one
call whether it later runs flash, memory-efficient or math kernels.  A counted
call's internals are not seen again (torch disables the mode while it runs),
so nothing is counted twice.  A DTensor operand counts by its local shard: the
FLOPs this process computes (``call_flops``, shared with galaxy.profiler.emulate).  Only forward passes are counted; backward runs
in the autograd engine and never reaches the mode.

Conventions (N = number of output elements unless said otherwise):

=====================================  ====================  ===================================
op                                     MACs                  FLOPs
=====================================  ====================  ===================================
F.linear x[..., in] -> [..., out]      N_rows*in*out         2*MACs (+ N_rows*out with bias)
matmul / @ / mm / bmm (A[..., K] @ B)  N*K                   2*MACs
addmm / baddbmm                        N*K                   2*MACs + N (the added term)
F.scaled_dot_product_attention         B*H*Tq*Tk*(D + Dv)    2*MACs + 5*B*H*Tq*Tk (softmax)
  (q [B.., H, Tq, D], k [.., Tk, D],   full Tq x Tk even when causal or masked; scale, mask and
   v [.., Tk, Dv])                     dropout are not counted; H = query heads (GQA-safe)
F.layer_norm                           0                     5*numel (+1*numel weight, +1 bias)
F.rms_norm                             0                     4*numel (+1*numel weight)
softmax (F., torch., Tensor.)          0                     5*numel
F.gelu                                 0                     8*numel (erf / tanh polynomial)
F.silu                                 0                     4*numel (neg, exp, add, div)
F.relu                                 0                     1*numel
F.embedding                            0                     0 (a gather)
add / sub / mul / div, + - * /         0                     1*N (output elements)
  (also in-place and reflected forms)
anything else (views, dropout, ...)    0                     0
=====================================  ====================  ===================================

Python-level helpers that are not in the table (e.g. ``F.multi_head_attention_forward``
behind ``nn.MultiheadAttention``) are opaque and count 0: write models with the
functions above.  Parameters: each module reports the parameters of its whole
subtree, each shared tensor once; the root's count is ``get_total_params()``.
Latency is wall time of each module's forward (summed over calls), with a CUDA
synchronize around it when CUDA is in use so device time is included.
"""

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# ----------------------------------------------------------------------------- rules
# A rule maps (args, kwargs, out) -> (flops, macs).


def _arg(args, kwargs, i, name):
    """Positional-or-keyword argument ``name`` at position ``i``."""
    return args[i] if len(args) > i else kwargs.get(name)


def _matmul(args, kwargs, out):
    # Every output element is a length-K dot product, K = last dim of the left operand.
    macs = out.numel() * _arg(args, kwargs, 0, "input").shape[-1]
    return 2 * macs, macs


def _addmm(args, kwargs, out):
    # addmm(input, mat1, mat2) / baddbmm(input, batch1, batch2): a product plus one add per output.
    left = args[1] if len(args) > 1 else kwargs.get("mat1", kwargs.get("batch1"))
    macs = out.numel() * left.shape[-1]
    return 2 * macs + out.numel(), macs


def _linear(args, kwargs, out):
    macs = out.numel() * _arg(args, kwargs, 1, "weight").shape[-1]
    has_bias = _arg(args, kwargs, 2, "bias") is not None
    return 2 * macs + has_bias * out.numel(), macs


_SOFTMAX_FLOPS = 5


def _sdpa(args, kwargs, out):
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    scores = q.numel() // q.shape[-1] * k.shape[-2]  # B*H*Tq*Tk
    macs = scores * (q.shape[-1] + v.shape[-1])
    return 2 * macs + _SOFTMAX_FLOPS * scores, macs


def _norm(base, *affine):
    """A norm's rule: `base` FLOPs per element, plus one per affine argument (position, name) given."""
    def rule(args, kwargs, out):
        return (base + sum(_arg(args, kwargs, i, name) is not None for i, name in affine)) * out.numel(), 0
    return rule


def _per_element(flops_per_element):
    return lambda args, kwargs, out: (flops_per_element * out.numel(), 0)


_T = torch.Tensor
_RULES = {
    F.linear: _linear,
    F.scaled_dot_product_attention: _sdpa,
    F.layer_norm: _norm(5, (2, "weight"), (3, "bias")),
    F.embedding: _per_element(0),  # a gather; listed to make the 0 a decision, not an omission
    F.rms_norm: _norm(4, (2, "weight")),
    F.gelu: _per_element(8),
    F.silu: _per_element(4),
    F.relu: _per_element(1),
    torch.addmm: _addmm,
    torch.baddbmm: _addmm,
    **dict.fromkeys((torch.matmul, torch.mm, torch.bmm, _T.matmul, _T.mm, _T.bmm), _matmul),
    **dict.fromkeys((F.softmax, torch.softmax, _T.softmax), _per_element(_SOFTMAX_FLOPS)),
    # add / sub / mul / div (in-place forms too), then the scalar-on-the-left operators
    **dict.fromkeys([getattr(owner, name + tail) for name in ("add", "sub", "mul", "div")
                     for owner, tail in ((torch, ""), (_T, ""), (_T, "_"))] + [torch.rsub, _T.__rsub__, _T.__rdiv__],
                    _per_element(1)),
}


def _local(x):
    """A DTensor's shard on this rank (what this process computes), anything else as it is. No DTensor
    exists unless torch.distributed.tensor was imported, and importing it here would cost every
    process ~0.6 s at start-up."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return x._local_tensor if dtensor is not None and isinstance(x, dtensor.DTensor) else x


def counts(func):
    """Whether calls of `func` do arithmetic this module counts (a rule in the table above)."""
    return func in _RULES


def call_flops(func, args, kwargs, out):
    """(FLOPs, MACs) of one call of a counted `func` (see `counts`) with its result `out`, as this
    process computes them: a DTensor operand counts by its local shard."""
    args, kwargs, out = tree_map(_local, (args, kwargs, out))
    return _RULES[func](args, kwargs, out)


# ----------------------------------------------------------------------------- profiler
@dataclass
class _Stats:  # in get_module_profile's order
    macs: int = 0
    flops: int = 0  # inclusive of submodules
    self_flops: int = 0  # ops called directly in this module's forward
    duration: float = 0.0  # seconds, summed over calls


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _CountMode(TorchFunctionMode):
    def __init__(self, profiler: "FlopsProfiler"):
        super().__init__()
        self.profiler = profiler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if counts(func) and self.profiler._stack:
            self.profiler._charge(*call_flops(func, args, kwargs, out))
        return out


class FlopsProfiler:
    """Counts forward FLOPs, MACs and latency per module of ``model``.

    Usage::

        prof = FlopsProfiler(model)
        prof.start()
        model(x)
        prof.stop()
        print(prof.profile_table(depth=2))
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._names = {m: n for n, m in model.named_modules()}
        self._stack: list[tuple[nn.Module, float]] = []
        self._handles = []
        self._mode = None
        self.reset()

    # -- lifecycle
    def start(self):
        """Install hooks and the counting mode; counts accumulate until ``stop()``."""
        if self._mode is not None:
            return
        for m in self._names:
            self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            # always_call: pop the stack even when forward raises.
            self._handles.append(m.register_forward_hook(self._post_hook, always_call=True))
        self._mode = _CountMode(self)
        self._mode.__enter__()

    def stop(self):
        """Remove hooks and the mode; the collected numbers stay readable."""
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def reset(self):
        """Zero all counters (hooks stay as they are)."""
        self._stats = {m: _Stats() for m in self._names}
        self._total = _Stats()  # its duration: top-level calls only

    # -- hooks
    def _pre_hook(self, module, args):
        _sync()
        self._stack.append((module, time.perf_counter()))

    def _post_hook(self, module, args, output):
        _sync()
        _, t0 = self._stack.pop()
        dt = time.perf_counter() - t0
        self._stats[module].duration += dt
        if not self._stack:  # a top-level call: that is what the totals time
            self._total.duration += dt

    def _charge(self, flops, macs):
        for s in [self._total] + [self._stats[module] for module, _ in self._stack]:
            s.flops += flops
            s.macs += macs
        self._stats[self._stack[-1][0]].self_flops += flops

    # -- results (totals = ops run inside any forward of the model's modules)
    def get_total_flops(self) -> int:
        return self._total.flops

    def get_total_macs(self) -> int:
        return self._total.macs

    def get_total_params(self) -> int:
        return _params(self.model)

    def get_total_duration(self) -> float:
        """Seconds spent in top-level module forwards."""
        return self._total.duration

    def get_module_profile(self, module: nn.Module) -> dict:
        """Numbers of one submodule: params, macs, flops (inclusive of its children),
        self_flops (its own code only) and duration (seconds)."""
        return {"params": _params(module), **vars(self._stats[module])}

    def profile_table(self, depth: int = -1) -> str:
        """One row per module down to ``depth`` (root = 0, -1 = all), indented by depth."""
        tot_flops = max(self._total.flops, 1)
        tot_time = max(self._total.duration, 1e-12)
        header = ("module", "params", "MACs", "FLOPs", "%FLOPs", "latency", "%time")
        rows = []
        for name, m in self.model.named_modules():
            level = name.count(".") + 1 if name else 0
            if depth >= 0 and level > depth:
                continue
            s = self._stats[m]
            label = "  " * level + (name.rsplit(".", 1)[-1] if name else "(root)") + f" ({type(m).__name__})"
            rows.append((label, _si(_params(m)), _si(s.macs), _si(s.flops),
                         f"{100 * s.flops / tot_flops:.1f}%", f"{s.duration * 1e3:.3f} ms",
                         f"{100 * s.duration / tot_time:.1f}%"))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

        def line(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])

    def print_model_profile(self, depth: int = -1, top_modules: int = 3, file=None):
        """Totals, the per-module table, and the ``top_modules`` modules whose own
        code (excluding submodules) performs the most FLOPs."""
        file = file or sys.stdout
        dur = self._total.duration
        print(f"params: {_si(self.get_total_params())}  MACs: {_si(self._total.macs)}  "
              f"FLOPs: {_si(self._total.flops)}  forward latency: {dur * 1e3:.3f} ms  "
              f"achieved: {_si(self._total.flops / dur if dur else 0)}FLOP/s", file=file)
        print(self.profile_table(depth), file=file)
        top = sorted(self._names, key=lambda m: self._stats[m].self_flops, reverse=True)[:top_modules]
        print(f"top {len(top)} modules by own FLOPs:", file=file)
        for m in top:
            f = self._stats[m].self_flops
            print(f"  {self._names[m] or '(root)'} ({type(m).__name__}): {_si(f)}FLOPs "
                  f"({100 * f / max(self._total.flops, 1):.1f}%)", file=file)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() dedups shared tensors


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:g} " if isinstance(x, float) else f"{x} "


def get_model_profile(model: nn.Module, args=(), kwargs=None, print_profile=True,
                      depth=-1, warm_up=1, top_modules=3, file=None):
    """Run ``warm_up`` unprofiled forwards, then one profiled forward (under no_grad:
    only the forward is counted, so autograd bookkeeping would just cost memory).
    Returns ``(flops, macs, params)``."""
    kwargs = kwargs or {}
    with torch.no_grad():
        for _ in range(warm_up):
            model(*args, **kwargs)
        prof = FlopsProfiler(model)
        prof.start()
        try:
            model(*args, **kwargs)
        finally:
            prof.stop()
    if print_profile:
        prof.print_model_profile(depth=depth, top_modules=top_modules, file=file)
    return prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
