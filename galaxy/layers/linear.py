"""Linears that hold a slice of a full weight, recorded in their ParamSpec so checkpoints can
slice and gather it."""
import torch.nn.functional as F
from torch import nn

from galaxy.layers.param_spec import GradSum, Shard, set_spec


class ColumnLinear(nn.Linear):
    """Output features `rows` of a full in -> out linear (column-parallel when rows is a slice)."""

    def __init__(self, in_features, rows, full_out, bias=True):
        super().__init__(in_features, len(rows), bias=bias)
        set_spec(self.weight, self.bias, shard=Shard(0, rows.start, len(rows), full_out))


class RowLinear(nn.Linear):
    """Input features `cols` of a full in -> out linear (row-parallel when cols is a slice).
    A row-parallel output is a partial sum, so only one rank (owns_bias) adds the bias, and the
    bias's gradient is summed over the tensor group."""

    def __init__(self, cols, full_in, out_features, bias=True, owns_bias=True):
        super().__init__(len(cols), out_features, bias=bias)
        self.owns_bias = owns_bias
        set_spec(self.weight, shard=Shard(1, cols.start, len(cols), full_in))
        if len(cols) < full_in:
            set_spec(self.bias, used_here=owns_bias, grad_sum=GradSum.STAGE)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias if self.owns_bias else None)
