"""Linears that hold a slice of a full weight, tagged so checkpoints can slice and gather.

Each parameter may carry:
    param.shard = (dim, start, length, full)  the slice [start, start+length) of the full (Hugging
                                        Face) tensor's `full` entries along `dim` that it holds
    param.partial_grad = True           replicated across the tensor group, but each rank's
                                        gradient is only its share: grads are summed over the group
"""
import torch.nn.functional as F
from torch import nn


def tag_shard(param, dim, owned, full):
    param.shard = (dim, owned.start, len(owned), full)


def mark_partial_grad(module):
    for p in module.parameters():
        p.partial_grad = True


class ColumnLinear(nn.Linear):
    """Output features `rows` of a full in -> out linear (column-parallel when rows is a slice)."""

    def __init__(self, in_features, rows, full_out, bias=True):
        super().__init__(in_features, len(rows), bias=bias)
        tag_shard(self.weight, 0, rows, full_out)
        if bias:
            tag_shard(self.bias, 0, rows, full_out)


class RowLinear(nn.Linear):
    """Input features `cols` of a full in -> out linear (row-parallel when cols is a slice).
    A row-parallel output is a partial sum, so only one rank (owns_bias) adds the bias."""

    def __init__(self, cols, full_in, out_features, bias=True, owns_bias=True):
        super().__init__(len(cols), out_features, bias=bias)
        self.owns_bias = owns_bias
        tag_shard(self.weight, 1, cols, full_in)
        if bias:
            self.bias.unused_here = not owns_bias  # gradient sync must not wait for it

    def forward(self, x):
        return F.linear(x, self.weight, self.bias if self.owns_bias else None)
