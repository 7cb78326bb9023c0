import pytest
import torch
import torch.nn as nn

from galaxy.adapters import SideNetwork, mark_only_side_as_trainable

H, LAYERS = 32, 3


def _backbone_states():
    backbone = nn.ModuleList(nn.Linear(H, H) for _ in range(LAYERS))
    states = [torch.randn(2, 5, H)]
    for layer in backbone:
        states.append(layer(states[-1]))
    return backbone, states


def test_output_shape_and_side_width():
    side = SideNetwork(H, LAYERS, side_reduction_factor=8)
    _, states = _backbone_states()
    assert side(states).shape == (2, 5, H)
    assert side.side_downsamplers[0].out_features == H // 8
    assert torch.allclose(torch.sigmoid(side.side_gates), torch.full((LAYERS,), 0.5))


def test_add_bias_sampling_false_drops_sampler_biases():
    side = SideNetwork(H, LAYERS, add_bias_sampling=False)
    assert side.side_upsample.bias is None
    assert all(s.bias is None for s in side.side_downsamplers)


def test_only_side_trains_and_backbone_gets_no_gradient():
    backbone, states = _backbone_states()
    model = nn.ModuleDict({"backbone": backbone, "side": SideNetwork(H, LAYERS)})
    mark_only_side_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("side.") for n in trainable)
    assert len(trainable) == sum(1 for _ in model["side"].parameters())

    model["side"](states).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert model["side"].side_gates.grad is not None


def test_wrong_number_of_states_raises():
    side = SideNetwork(H, LAYERS)
    _, states = _backbone_states()
    with pytest.raises(ValueError, match="expected 4 hidden states"):
        side(states[1:])
