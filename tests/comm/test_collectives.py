"""Each autograd collective, forward and backward, against a single-process reference."""
import pytest
import torch
import torch.distributed as dist

from galaxy.comm import collectives as C
from tests.helpers import run_ranks, seeded

SIZES = {2: [3, 1], 3: [3, 0, 2]}  # a rank may own nothing (a decode step's one position)
DIM = 1  # a middle dimension, so the movedim paths are exercised
SHAPE = (2, None, 4)


def full_shape(sizes):
    return SHAPE[0], sum(sizes), SHAPE[2]


def local_shape(sizes, r):
    return SHAPE[0], sizes[r], SHAPE[2]


def weight(r, shape):
    """Rank-specific upstream gradient so sums are visible."""
    return seeded(*shape, seed=100 + r)


def _run_all(rank, world, choice):
    g = dist.group.WORLD
    if choice == "padded":  # the native collectives NCCL runs, on slices padded to the longest
        C.implementation(g, C.PADDED)
    sizes = SIZES[world]
    out = {}
    full = full_shape(sizes)

    def grad_of(fn, x, w):
        x = x.clone().requires_grad_()
        y = fn(x)
        (y * w).sum().backward()
        return y.detach(), x.grad

    x = seeded(*full, seed=1)  # identical on all ranks
    out["copy_to_all"] = grad_of(lambda t: C.copy_to_all(t, g), x, weight(rank, full))
    out["all_reduce"] = grad_of(lambda t: C.all_reduce(t, g), seeded(*full, seed=10 + rank), weight(0, full))
    start = sum(sizes[:rank])
    w_full = weight(0, full)
    out["split_scatter"] = grad_of(lambda t: C.split_scatter(t, DIM, sizes, g), x,
                                   w_full[:, start:start + sizes[rank]])
    local = seeded(*local_shape(sizes, rank), seed=20 + rank)
    out["gather_along_dim"] = grad_of(lambda t: C.gather_along_dim(t, DIM, sizes, g), local, w_full)
    out["reduce_scatter"] = grad_of(lambda t: C.reduce_scatter(t, DIM, sizes, g), seeded(*full, seed=30 + rank),
                                    w_full[:, start:start + sizes[rank]])
    out["all_gather"] = grad_of(lambda t: C.all_gather(t, DIM, sizes, g), local, weight(rank, full))
    return out


@pytest.mark.parametrize("choice", ["backend", "padded"])
@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_reference(world, choice):
    results = run_ranks(_run_all, world, choice)
    sizes = SIZES[world]
    full = full_shape(sizes)
    x = seeded(*full, seed=1)
    w_full = weight(0, full)
    w_sum = sum(weight(r, full) for r in range(world))
    slices = lambda t: t.split(sizes, DIM)
    locals_ = [seeded(*local_shape(sizes, r), seed=20 + r) for r in range(world)]
    summed = sum(seeded(*full, seed=30 + r) for r in range(world))
    for r, out in enumerate(results):
        y, gx = out["copy_to_all"]
        assert torch.equal(y, x) and torch.allclose(gx, w_sum, atol=1e-6)
        y, gx = out["all_reduce"]
        assert torch.allclose(y, sum(seeded(*full, seed=10 + q) for q in range(world)), atol=1e-6)
        assert torch.equal(gx, w_full)
        y, gx = out["split_scatter"]
        assert torch.equal(y, slices(x)[r]) and torch.equal(gx, w_full)
        y, gx = out["gather_along_dim"]
        assert torch.equal(y, torch.cat(locals_, DIM)) and torch.equal(gx, slices(w_full)[r])
        y, gx = out["reduce_scatter"]
        assert torch.allclose(y, slices(summed)[r], atol=1e-6) and torch.equal(gx, w_full)
        y, gx = out["all_gather"]
        assert torch.equal(y, torch.cat(locals_, DIM)) and torch.allclose(gx, slices(w_sum)[r], atol=1e-6)


def test_implementation_is_chosen_once_per_group(monkeypatch):
    gloo, nccl = object(), object()
    asked = []
    monkeypatch.setattr(C, "_chosen", {})
    monkeypatch.setattr(C.dist, "get_backend", lambda g: asked.append(g) or ("gloo" if g is gloo else "nccl"))
    for _ in range(3):
        assert C.implementation(gloo) == C.DIRECT and C.implementation(nccl) == C.PADDED
    assert asked == [gloo, nccl]


def test_sizes_are_checked():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="sizes"):
        C.split_scatter(x, 1, [2, 2], None)
