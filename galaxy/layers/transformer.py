"""One transformer layer as four blocks, ATT -> CON1 -> MLP -> CON2, joined by the
placement table (galaxy.layers.placement): the plan says each block's method, the
collectives between blocks follow from it.

CON is dropout + residual add, plus the norm for post-norm models (BERT, BART). Pre-norm
models (LLaMA) pass `norm_in`/`norm_mid`, which run *before* redistribution, i.e. on the
local shard when the connective block is sequence-parallel.
"""
from functools import partial

import torch
from torch import nn

from galaxy.comm import stats
from galaxy.layers.dropout import LayoutInvariantDropout, masks_as_in_forward
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.placement import PRODUCES, REPLICATE, SEQ, consumes, redistribute
from galaxy.layers.tiling import tiling_for
from galaxy.plan import Method


class Connective(nn.Module):
    def __init__(self, norm, dropout_p, site, method, ctx):
        super().__init__()
        self.norm, self.method, self.ctx = norm, method, ctx
        self.dropout = LayoutInvariantDropout(dropout_p, site)
        self.adapter = None  # a bottleneck adapter set by galaxy.tuning.apply (Houlsby: before the residual add)
        if method is Method.SP:
            set_spec(*self.parameters(), grad_sum=GradSum.STAGE)

    def forward(self, h, residual):
        full_shape, index = None, None
        if self.method is Method.SP:
            pos = self.ctx.positions
            full_shape = (h.shape[0], sum(self.ctx.plan.positions)) + tuple(h.shape[2:])
            index = (slice(None), slice(pos.start, pos.stop))
        h = self.dropout(h, full_shape, index)
        if self.adapter is not None:
            h = self.adapter(h)
        x = h + residual
        return self.norm(x) if self.norm is not None else x


class TransformerLayer(nn.Module):
    def __init__(self, attn, mlp, con1, con2, plan, input_placement, norm_in=None, norm_mid=None, overlap_tiles=1):
        super().__init__()
        self.attn, self.con1, self.mlp, self.con2 = attn, con1, mlp, con2
        self.norm_in, self.norm_mid = norm_in, norm_mid
        self.plan, self.input_placement = plan, input_placement
        for norm, placement in ((norm_in, input_placement), (norm_mid, self.output_placement)):
            if norm is not None and placement == SEQ:
                set_spec(*norm.parameters(), grad_sum=GradSum.STAGE)
        self.set_tiles(overlap_tiles)

    def set_tiles(self, overlap_tiles):
        """TP blocks next to SP connectives may fuse their edge collectives into their linears; their
        tile geometry lives on the context's device."""
        self.attn.tiling = tiling_for(self.plan.att, self.input_placement, self.plan.con, self.attn.ctx, overlap_tiles)
        self.mlp.tiling = tiling_for(self.plan.mlp, self.output_placement, self.plan.con, self.attn.ctx, overlap_tiles)

    @property
    def output_placement(self):
        return consumes(self.plan.con)

    def forward(self, x, attn_bias=None):
        x = sublayer(self.attn, self.plan.att, self.con1, x, self.input_placement, attn_bias, norm=self.norm_in)
        return sublayer(self.mlp, self.plan.mlp, self.con2, x, self.output_placement, norm=self.norm_mid)


def sublayer(block, method, con, x, placement, *args, norm=None, **kwargs):
    """One block of `method` and its connective: con(block(norm(x)), x), each operand moved by the
    placement table. x is in `placement`; the result is in what the connective consumes."""
    h = x if norm is None else norm(x)
    tiling = getattr(block, "tiling", None)  # a tiled block gathers its input / scatters its output itself
    name = type(block).__name__  # the site labels say which boundary a collective sits at (--explain)
    with stats.site(f"{name} in"):
        h = h if tiling is not None and tiling.gather_in else redistribute(h, placement, method, con.ctx)
    with stats.site(name):  # e.g. a tiled block's own gathers, SP attention's K/V
        out = block(h, *args, **kwargs)
    produced = SEQ if tiling is not None and tiling.scatter_out else PRODUCES[method]
    with stats.site(f"{name} out -> connective"):
        out = redistribute(out, produced, con.method, con.ctx)
    with stats.site("residual -> connective"):
        return con(out, redistribute(x, placement, con.method, con.ctx))


def chain(make_layer, indices):
    """Layers make_layer(i, input_placement) for i in indices, each fed in its predecessor's output
    placement (the first: REPLICATE)."""
    layers, placement = [], REPLICATE
    for i in indices:
        layers.append(make_layer(i, placement))
        placement = layers[-1].output_placement
    return layers


def build_chunks(ctx, make_layer):
    """A rank's layers, keyed by global layer number (so names match the full model's), and the
    keys of each of its chunks (one chunk unless interleaved 1F1B gives it virtual stages).
    make_layer(index, input_placement) builds one; a chunk's input arrives replicated."""
    chunks = [ctx.chunk_layers(c) for c in range(ctx.plan.virtual_stages)]
    layers = nn.ModuleDict({str(i): layer for c in chunks for i, layer in zip(c, chain(make_layer, c), strict=True)})
    return layers, [[str(i) for i in c] for c in chunks]


def run_layers(layers, x, attn_bias, checkpoint=False, extra=()):
    """Run layers in order (each called as layer(x, attn_bias, *extra)) on x, REPLICATE; returns the
    activation and its placement."""
    for layer in layers:
        if checkpoint and layer.training:
            x = torch.utils.checkpoint.checkpoint(layer, x, attn_bias, *extra, use_reentrant=False,
                                                  context_fn=partial(masks_as_in_forward, layer))
        else:
            x = layer(x, attn_bias, *extra)
    return x, layers[-1].output_placement if layers else REPLICATE
