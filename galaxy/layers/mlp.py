"""Feed-forward block over the intermediate columns this rank owns.

    NONE  all columns                        -> output REPLICATE
    TP    columns ctx.columns (up/gate column-parallel, down row-parallel) -> output PARTIAL
    SP    all columns on this rank's positions -> output SEQ
"""
import torch.nn.functional as F
from torch import nn

from galaxy.layers.linear import ColumnLinear, RowLinear
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.tiling import column_in, row_out
from galaxy.plan import Method

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, hidden, intermediate, method, ctx, *, act="gelu", gated=False, bias=True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act '{act}' is not one of {sorted(ACTIVATIONS)}")
        self.act, self.method = ACTIVATIONS[act], method
        cols = ctx.columns if method is Method.TP else range(intermediate)
        self.gate = ColumnLinear(hidden, cols, intermediate, bias) if gated else None
        self.up = ColumnLinear(hidden, cols, intermediate, bias)
        self.down = RowLinear(cols, intermediate, hidden, bias, owns_bias=method is not Method.TP or ctx.tp_rank == 0)
        if method is Method.SP:
            set_spec(*self.parameters(), grad_sum=GradSum.STAGE)
        self.tiling = None  # set by TransformerLayer when overlap_tiles > 1 (galaxy.layers.tiling)

    def forward(self, x):
        if self.gate is not None:
            gate, up = column_in(x, (self.gate, self.up), self.tiling)
            h = self.act(gate) * up
        else:
            h = self.act(column_in(x, (self.up,), self.tiling)[0])
        return row_out(h, self.down, self.tiling)
