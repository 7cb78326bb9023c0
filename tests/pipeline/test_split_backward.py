"""The backward split into B (input gradient) and W (weight gradients) equals one whole backward,
and W does not run the input-gradient path again."""
import torch
from torch import nn

from galaxy.models.llama.model import RMSNorm
from galaxy.pipeline.split_backward import backward_input


def _layers(x):
    """A stage of linears and norms; also counts how often a gradient reaches its middle activation."""
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU())
    second = nn.Sequential(nn.Linear(16, 16, bias=False), RMSNorm(16, 1e-6), nn.Linear(16, 8))
    mid, h = [], first(x)
    h.register_hook(mid.append)
    return [*first.parameters(), *second.parameters()], second(h), mid


def _shared(x):
    """Weights used twice: a gate in g * a + (1 - g) * b, a linear applied twice in a row."""
    torch.manual_seed(0)
    lin, gate = nn.Linear(8, 8), nn.Parameter(torch.tensor([0.3]))
    g = torch.sigmoid(gate)
    return [*lin.parameters(), gate], g * lin(x) + (1 - g) * lin(lin(x)).tanh(), []


def _grads(stage, split):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights, y, mid = stage(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    if split:
        weights_part = backward_input([y], [dy], [x])
        assert all(w.grad is None for w in weights) and x.grad is not None  # B: the input's gradient only
        calls = len(mid)
        weights_part()
        assert len(mid) == calls  # W started from the weights' nodes: nothing flowed through the activations
    else:
        y.backward(dy)
    return [x.grad] + [w.grad for w in weights]


def test_split_backward_equals_whole_backward():
    for stage in (_layers, _shared):
        for got, want in zip(_grads(stage, True), _grads(stage, False), strict=True):
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), stage.__name__


def test_without_an_input_w_runs_the_whole_backward():
    weights, y, _ = _layers(torch.randn(2, 8))
    weights_part = backward_input([y.sum()], None, [])
    assert all(w.grad is None for w in weights)
    weights_part()
    assert all(w.grad is not None for w in weights)
