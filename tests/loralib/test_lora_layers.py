import pytest
import torch
import torch.nn as nn

from galaxy.loralib import Linear

torch.manual_seed(0)
F64 = dict(dtype=torch.float64)


def _randomize_b(layer):
    with torch.no_grad():
        layer.lora_B.normal_()


def test_fresh_lora_linear_equals_nn_linear_exactly():
    ref = nn.Linear(16, 8)
    lora = Linear(16, 8, r=4, lora_alpha=8)
    lora.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), ref(x))


def test_r0_is_plain_linear():
    lora = Linear(16, 8)
    assert not hasattr(lora, "lora_A") and lora.weight.requires_grad
    lora.eval()
    assert not lora.merged


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores_weight(fan_in_fan_out):
    lora = Linear(16, 8, r=4, lora_alpha=16, fan_in_fan_out=fan_in_fan_out, **F64)
    _randomize_b(lora)
    x = torch.randn(3, 16, **F64)
    frozen = lora.weight.clone()
    unmerged = lora(x)
    lora.eval()
    assert lora.merged
    torch.testing.assert_close(lora(x), unmerged, atol=1e-6, rtol=0)
    lora.train()
    assert not lora.merged
    torch.testing.assert_close(lora.weight, frozen, atol=1e-12, rtol=0)


def test_no_merge_when_merge_weights_false():
    lora = Linear(16, 8, r=4, merge_weights=False)
    _randomize_b(lora)
    frozen = lora.weight.clone()
    lora.eval()
    assert not lora.merged and torch.equal(lora.weight, frozen)


def test_fan_in_fan_out_loads_conv1d_weight():
    # GPT-2 Conv1D stores [in, out] and computes x @ W + b.
    conv_w, conv_b = torch.randn(16, 8, **F64), torch.randn(8, **F64)
    lora = Linear(16, 8, r=4, fan_in_fan_out=True, **F64)
    assert lora.weight.shape == (16, 8)
    lora.load_state_dict({"weight": conv_w, "bias": conv_b}, strict=False)
    x = torch.randn(3, 16, **F64)
    torch.testing.assert_close(lora(x), x @ conv_w + conv_b)
    # Same LoRA pair on the untransposed layout gives the same function.
    _randomize_b(lora)
    plain = Linear(16, 8, r=4, **F64)
    plain.load_state_dict({"weight": conv_w.T, "bias": conv_b,
                           "lora_A": lora.lora_A, "lora_B": lora.lora_B})
    torch.testing.assert_close(lora(x), plain(x))


def test_trainable_parameters_are_r_times_in_plus_out():
    lora = Linear(16, 8, r=4, bias=False)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == 4 * (16 + 8)
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (8, 4)


def _shard(full_state, kind, start, length):
    """Slice a full LoRA Linear state: a column shard holds rows of weight and lora_B, a row
    shard columns of weight and lora_A."""
    dim, held = (0, "lora_B") if kind == "column" else (1, "lora_A")
    shard = {"weight": full_state["weight"].narrow(dim, start, length)}
    for name in ("lora_A", "lora_B"):
        shard[name] = full_state[name].narrow(dim, start, length) if name == held else full_state[name]
    return shard


@pytest.mark.parametrize("kind", ["column", "row"])
def test_sharded_lora_matches_full(kind):
    in_f, out_f, parts = 12, 8, 2
    full = Linear(in_f, out_f, r=4, lora_alpha=8, bias=False, **F64)
    _randomize_b(full)
    x = torch.randn(3, in_f, **F64)
    split = out_f if kind == "column" else in_f
    length = split // parts
    outs = []
    for rank in range(parts):
        start = rank * length
        shape = (in_f, length) if kind == "column" else (length, out_f)
        shard = Linear(*shape, r=4, lora_alpha=8, bias=False, **F64)
        shard.load_state_dict(_shard(full.state_dict(), kind, start, length))
        x_local = x if kind == "column" else x[:, start:start + length]
        outs.append(shard(x_local))
    combined = torch.cat(outs, dim=-1) if kind == "column" else sum(outs)
    torch.testing.assert_close(combined, full(x))
