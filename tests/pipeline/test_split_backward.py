"""The backward split into B (input gradient) and W (weight gradients) equals one whole backward,
and W does not run the input-gradient path again."""
import pytest
import torch
from torch import nn

from galaxy.models.llama.model import RMSNorm
from galaxy.pipeline.split_backward import backward_input, backward_weight


def _stage():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16, bias=False), RMSNorm(16, 1e-6),
                         nn.Linear(16, 8))


def _run(split):
    stage, x = _stage(), torch.randn(3, 5, 8, requires_grad=True)
    mid = []  # the gradient reaching the activation between the layers, each time it is computed
    h = stage[:3](x)
    h.register_hook(lambda g: mid.append(g))
    y = stage[3:](h)
    dy = torch.randn_like(y)
    if split:
        work = backward_input([y], [dy], [x])
        assert all(p.grad is None for p in stage.parameters())  # B: the input's gradient only
        assert len(mid) == 1
        backward_weight(work)
    else:
        y.backward(dy)
    return x.grad, {n: p.grad for n, p in stage.named_parameters()}, len(mid)


def test_split_backward_equals_whole_backward_without_repeating_the_input_path():
    x_grad, grads, mid_calls = _run(split=True)
    want_x, want, _ = _run(split=False)
    assert torch.allclose(x_grad, want_x, rtol=0, atol=1e-6)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        assert torch.allclose(g, want[name], rtol=1e-6, atol=1e-7), name
    assert mid_calls == 1  # W started from the weights' nodes: nothing flowed through the activations again


def test_without_an_input_w_runs_the_whole_backward():
    stage = _stage()
    y = stage(torch.randn(2, 8))
    work = backward_input([y.sum()], None, [])
    assert all(p.grad is None for p in stage.parameters())
    backward_weight(work)
    assert all(p.grad is not None for p in stage.parameters())


def test_a_weight_used_twice_is_refused():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match="used twice"):
        backward_input([lin(lin(x)).sum()], None, [x])
