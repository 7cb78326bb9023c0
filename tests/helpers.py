"""Shared test helper: run a function on N gloo ranks (free port, timeout) and collect results."""
import torch

from galaxy.comm.launch import spawn


def run_ranks(fn, world, *args, timeout_s=120.0):
    """fn(rank, world, *args) on `world` processes; returns the per-rank results."""
    return spawn(fn, world, args, backend="gloo", timeout_s=timeout_s)


def rel_err(a, b, floor=1e-6):
    """||a - b|| / ||b||. The floor keeps gradients that are analytically zero (a key bias under
    softmax is one: it shifts every score of a row equally) from dividing rounding noise by ~0."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def seeded(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)
