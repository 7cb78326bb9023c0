"""LoRA on one rank's shard of a galaxy ColumnLinear / RowLinear (galaxy.tuning.apply adds it).

A column-parallel projection (output rows split) keeps lora_A whole and holds lora_B's rows; a
row-parallel one (input columns split) holds lora_A's columns and keeps lora_B whole. The whole
factor's gradient is then one rank's share of a sum (GradSum.STAGE); in an SP block every
parameter's is, like the block's own weights (each rank saw only its positions). LoraShard takes
over the base's weight and bias Parameters (loaded values and ParamSpecs, so checkpoints still
find them); its dropout mask is its part of the full input's mask, so it matches the serial run's.
"""
import torch.nn.functional as F

from galaxy.layers.dropout import LayoutInvariantDropout
from galaxy.layers.param_spec import GradSum, set_spec, spec_of
from galaxy.plan import Method

from .layers import Linear


class LoraShard(Linear):
    def __init__(self, base, cfg, method, ctx, site):
        out_features, in_features = base.weight.shape
        super().__init__(in_features, out_features, r=cfg["lora_dim"], lora_alpha=cfg["lora_alpha"],
                         merge_weights=cfg["merge_weights"], bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.owns_bias = getattr(base, "owns_bias", True)  # a row-parallel bias is added on one rank
        self.lora_dropout = LayoutInvariantDropout(cfg["lora_dropout"], site)
        self.ctx, self.seq_sharded = ctx, method is Method.SP
        shard = spec_of(base.weight).shard
        held, whole = (self.lora_B, self.lora_A) if shard.dim == 0 else (self.lora_A, self.lora_B)
        set_spec(held, shard=shard)
        self.in_cols = shard if shard.dim == 1 else None
        if shard.length < shard.full:
            set_spec(whole, grad_sum=GradSum.STAGE)
        if self.seq_sharded:
            set_spec(*self.parameters(), grad_sum=GradSum.STAGE)

    def _dropout_view(self, x):
        """The full [B, T, in] LoRA input's shape and this rank's index into it."""
        full, seq, cols = list(x.shape), slice(None), slice(None)
        if self.seq_sharded:
            pos = self.ctx.positions
            full[1], seq = sum(self.ctx.plan.positions), slice(pos.start, pos.stop)
        if self.in_cols is not None:
            cols, full[-1] = slice(self.in_cols.start, self.in_cols.start + self.in_cols.length), self.in_cols.full
        return tuple(full), (slice(None), seq, cols)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias if self.owns_bias else None)
        if self.merged:
            return out
        dropped = self.lora_dropout(x, *self._dropout_view(x))
        return out + (dropped @ self.lora_A.T @ self.lora_B.T) * self.scaling
