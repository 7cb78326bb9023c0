"""FlopsProfiler against hand counts (conventions in galaxy/profiler/flops.py) and
against torch's own FlopCounterMode, which counts 2*MACs of mm/addmm/bmm/SDPA only."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from galaxy.profiler import FlopsProfiler, get_model_profile

D, HEADS, B, T = 32, 4, 2, 8


class SelfAttention(nn.Module):
    def __init__(self, manual=False):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D, bias=False)
        self.manual = manual

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.manual:  # the same math spelled with @, softmax and a scalar multiply
            y = torch.softmax((q @ k.transpose(-1, -2)) * (D // HEADS) ** -0.5, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def mlp():
    return nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))


def profile(model, x):
    prof = FlopsProfiler(model)
    prof.start()
    with torch.no_grad():
        model(x)
    prof.stop()
    return prof


def torch_flops(model, x):
    # CPU's fused SDPA kernel is not in FlopCounterMode's table; the math backend
    # decomposes into bmm, which is.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def test_linear_hand_count():
    prof = profile(nn.Linear(16, 32), torch.randn(3, 5, 16))
    rows = 3 * 5
    assert prof.get_total_macs() == rows * 16 * 32
    assert prof.get_total_flops() == 2 * rows * 16 * 32 + rows * 32  # + bias adds
    assert prof.get_total_params() == 16 * 32 + 32


def test_mlp_hand_count_and_torch_agreement():
    model, x = mlp(), torch.randn(B, T, D)
    prof = profile(model, x)
    n = B * T
    macs = n * D * 4 * D * 2
    assert prof.get_total_macs() == macs
    assert prof.get_total_flops() == 2 * macs + n * 4 * D + n * D + 8 * n * 4 * D  # biases, gelu
    assert 2 * prof.get_total_macs() == torch_flops(model, x)
    assert prof.get_module_profile(model[1])["flops"] == 8 * n * 4 * D


@pytest.mark.parametrize("manual", [False, True])
def test_attention_hand_count_and_torch_agreement(manual):
    model, x = SelfAttention(manual), torch.randn(B, T, D)
    prof = profile(model, x)
    n, scores = B * T, B * HEADS * T * T
    proj_macs = n * D * 3 * D + n * D * D
    attn_macs = scores * (D // HEADS) * 2  # QK^T and PV
    assert prof.get_total_macs() == proj_macs + attn_macs
    # SDPA: 5 flops per score; manual: softmax 5 + scalar multiply 1 per score.
    extra = 5 * scores + (scores if manual else 0)
    assert prof.get_total_flops() == 2 * (proj_macs + attn_macs) + n * 3 * D + extra
    assert 2 * prof.get_total_macs() == torch_flops(model, x)
    # Attention math runs in SelfAttention's own forward, the projections in its children.
    assert prof.get_module_profile(model)["self_flops"] == 2 * attn_macs + extra


def test_norms_and_elementwise():
    x = torch.randn(4, D)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.rms = nn.LayerNorm(D), nn.RMSNorm(D)

        def forward(self, x):
            return F.silu(self.rms(self.ln(x))) + x

    n = x.numel()
    assert profile(Block(), x).get_total_flops() == 7 * n + 5 * n + 4 * n + n


def test_params_per_module_and_shared_weights():
    model = nn.Sequential(nn.Embedding(10, D), mlp(), nn.Linear(D, 10, bias=False))
    model[2].weight = model[0].weight  # tied: counted once
    prof = profile(model, torch.randint(0, 10, (B, T)))
    mlp_params = D * 4 * D + 4 * D + 4 * D * D + D
    assert prof.get_module_profile(model[1])["params"] == mlp_params
    assert prof.get_module_profile(model[1][1])["params"] == 0
    assert prof.get_module_profile(model[2])["params"] == 10 * D
    assert prof.get_total_params() == 10 * D + mlp_params
    assert prof.get_module_profile(model[0])["flops"] == 0  # embedding is a gather


def test_totals_are_module_inclusive_and_stop_removes_hooks():
    model, x = mlp(), torch.randn(B, T, D)
    prof = FlopsProfiler(model)
    prof.start()
    model(x)
    x @ x.transpose(-1, -2)  # outside any module: not the model's work
    prof.stop()
    once = prof.get_total_flops()
    assert once == prof.get_module_profile(model)["flops"] > 0
    assert prof.get_total_duration() > 0
    model(x)  # after stop(): not counted
    assert prof.get_total_flops() == once
    prof.reset()
    assert prof.get_total_flops() == prof.get_total_macs() == 0


def test_depth_limited_table_and_printout():
    model = nn.Sequential(SelfAttention(), mlp())
    prof = profile(model, torch.randn(B, T, D))
    table = prof.profile_table(depth=1)
    assert "(root) (Sequential)" in table and "0 (SelfAttention)" in table and "1 (Sequential)" in table
    assert "qkv" not in table and "GELU" not in table
    assert "qkv (Linear)" in prof.profile_table()
    buf = io.StringIO()
    prof.print_model_profile(depth=2, top_modules=2, file=buf)
    assert "FLOP/s" in buf.getvalue() and "top 2 modules" in buf.getvalue()


def test_get_model_profile_returns_counts():
    model, x = mlp(), torch.randn(B, T, D)
    buf = io.StringIO()
    flops, macs, params = get_model_profile(model, (x,), warm_up=1, file=buf)
    assert macs == B * T * D * 4 * D * 2 and flops > 2 * macs
    assert params == sum(p.numel() for p in model.parameters())
    assert "GELU" in buf.getvalue()


def test_backward_not_counted_and_failed_forward_unwinds():
    model = mlp()
    prof = FlopsProfiler(model)
    prof.start()
    model(torch.randn(B, T, D)).sum().backward()
    forward_only = prof.get_total_flops()
    with pytest.raises(RuntimeError):
        model(torch.randn(B, T, D + 1))  # shape error inside model[0]
    prof.reset()
    model(torch.randn(B, T, D))  # the stack unwound, so this still counts as a top-level call
    prof.stop()
    assert prof.get_total_flops() == forward_only and prof.get_total_duration() > 0
