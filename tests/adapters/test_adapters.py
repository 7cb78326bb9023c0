import pytest
import torch
import torch.nn as nn

from galaxy.adapters import Adapter, make_activation, mark_only_adapters_as_trainable


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "tanh"])
def test_fresh_adapter_is_identity(non_linearity):
    adapter = Adapter(16, 4, non_linearity)
    h = torch.randn(2, 5, 16)
    assert torch.equal(adapter(h), h)


def test_adapter_learns_away_from_identity():
    adapter = Adapter(16, 4)
    h = torch.randn(2, 5, 16)
    adapter(h).pow(2).sum().backward()
    assert adapter.adapter_up.weight.grad.abs().sum() > 0


def test_unknown_non_linearity_raises():
    with pytest.raises(ValueError, match="'swish'"):
        make_activation("swish")


def test_mark_only_adapters_as_trainable():
    model = nn.ModuleDict({"backbone": nn.Linear(16, 16), "ffn_out": Adapter(16, 4)})
    mark_only_adapters_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ffn_out.adapter_down.weight", "ffn_out.adapter_down.bias",
                         "ffn_out.adapter_up.weight", "ffn_out.adapter_up.bias"}
