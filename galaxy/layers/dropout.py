"""Dropout whose mask does not depend on the layout.

Each call draws the mask of the *whole* tensor from a generator seeded by (step seed, site)
and keeps this rank's slice. So every shard gets its own part of the mask, runs are
reproducible, and a sharded run drops exactly the elements the serial run drops. The
price is drawing random numbers for the full shape on every rank; the mask costs no
communication.
"""
import torch
from torch import nn


class LayoutInvariantDropout(nn.Module):
    def __init__(self, p, site):
        super().__init__()
        self.p = p
        self.site = site  # a stable small integer: the same dropout in every layout
        self.step_seed = 0  # set by set_dropout_seed before every micro-batch

    def forward(self, x, full_shape=None, index=None):
        if not self.training or self.p == 0.0:
            return x
        gen = torch.Generator(device=x.device).manual_seed(hash((self.step_seed, self.site)) & (2**62))
        keep = torch.rand(full_shape or x.shape, generator=gen, device=x.device)
        if index is not None:
            keep = keep[index]
        return x * (keep >= self.p).to(x.dtype) / (1.0 - self.p)


def set_dropout_seed(model, seed):
    """Give every dropout site this micro-batch's seed (recomputation then redraws the same mask)."""
    for m in model.modules():
        if isinstance(m, LayoutInvariantDropout):
            m.step_seed = seed
