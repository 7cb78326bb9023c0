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
    assert side.side_downsamplers["0"].out_features == H // 8
    gates = torch.cat(list(side.side_gates.values()))
    assert torch.allclose(torch.sigmoid(gates), torch.full((LAYERS,), 0.5))


def test_add_bias_sampling_false_drops_sampler_biases():
    side = SideNetwork(H, LAYERS, add_bias_sampling=False)
    assert side.side_upsample.bias is None
    assert all(s.bias is None for s in side.side_downsamplers.values())


def test_only_side_trains_and_backbone_gets_no_gradient():
    backbone, states = _backbone_states()
    model = nn.ModuleDict({"backbone": backbone, "side": SideNetwork(H, LAYERS)})
    mark_only_side_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("side.") for n in trainable)
    assert len(trainable) == sum(1 for _ in model["side"].parameters())

    model["side"](states).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(g.grad is not None for g in model["side"].side_gates.values())


def test_wrong_number_of_states_raises():
    side = SideNetwork(H, LAYERS)
    _, states = _backbone_states()
    with pytest.raises(ValueError, match="expected 4 hidden states"):
        side(states[1:])


def test_parts_split_by_layers_have_the_full_networks_names_and_output():
    """A pipeline stage builds the part for its layers; the parts chained compute the full network."""
    _, states = _backbone_states()
    full = SideNetwork(H, LAYERS)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_()
    first = SideNetwork(H, range(0, 2), last=False)
    last = SideNetwork(H, range(2, LAYERS), first=False)
    names = [n for part in (first, last) for n, _ in part.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in full.named_parameters())
    weights = full.state_dict()
    for part in (first, last):
        part.load_state_dict({n: weights[n] for n in part.state_dict()})
    side_state = first(states[:3])
    assert side_state.shape == (2, 5, H // 8)
    assert torch.equal(last(states[3:], side_state), full(states))
    with pytest.raises(ValueError, match="side state"):
        last(states[3:])
