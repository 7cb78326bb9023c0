"""How a tensor-parallel block between sequence-parallel blocks runs its edge collectives
fused into its own linears, tile by tile (galaxy.comm.overlap), when overlap_tiles > 1.

TransformerLayer gives such a block a Tiling; the block then calls `column_in` for its input
projections and `row_out` for its output projection:

    gather_in    its input arrives as this rank's sequence shard (SEQ): column_in gathers it
    scatter_out  its output goes to a sequence-parallel block: row_out reduce-scatters it

Without a Tiling both are the plain linears, and the layer's redistribute does the collectives.
"""
from galaxy.comm import collectives as C
from galaxy.comm import overlap
from galaxy.layers.linear import ColumnLinear, RowLinear
from galaxy.layers.placement import SEQ, SEQ_DIM
from galaxy.plan import Method


class Tiling:
    """The block's gather tiles in overlap_tiles' order and its scatter tiles in the reverse one."""

    def __init__(self, tiles, ctx, gather_in, scatter_out):
        self.group, self.positions = ctx.tp_group, ctx.plan.positions
        self.gather_in, self.scatter_out = gather_in, scatter_out
        shares = overlap.tile_shares(tiles)
        self.gather_tiles = overlap.SeqTiles(ctx.plan.positions, ctx.tp_rank, shares)
        self.scatter_tiles = overlap.SeqTiles(ctx.plan.positions, ctx.tp_rank, shares[::-1])


def tiling_for(method, src, con, ctx, tiles):
    """A Tiling for a block of `method` fed from placement `src` and feeding connective `con`, or None."""
    if len(overlap.tile_shares(tiles)) <= 1 or method is not Method.TP or ctx.tp_group is None:
        return None
    gather_in, scatter_out = src == SEQ, con is Method.SP
    return Tiling(tiles, ctx, gather_in, scatter_out) if gather_in or scatter_out else None


def column_in(x, linears, tiling):
    """Every linear applied to x (gathered along the sequence first when tiling.gather_in)."""
    if tiling is None or not tiling.gather_in:
        return [lin(x) for lin in linears]
    if any(type(lin) is not ColumnLinear for lin in linears):  # e.g. LoRA-wrapped: unfused gather
        x = C.all_gather(x, SEQ_DIM, tiling.positions, tiling.group)
        return [lin(x) for lin in linears]
    return overlap.gather_linear(x, [lin.weight for lin in linears], [lin.bias for lin in linears],
                                 tiling.gather_tiles, tiling.group)


def row_out(h, linear, tiling):
    """linear(h) (reduce-scattered along the sequence when tiling.scatter_out)."""
    if tiling is None or not tiling.scatter_out:
        return linear(h)
    if type(linear) is not RowLinear:
        return C.reduce_scatter(linear(h), SEQ_DIM, tiling.positions, tiling.group)
    bias = linear.bias if linear.owns_bias else None
    return overlap.linear_reduce_scatter(h, linear.weight, bias, tiling.scatter_tiles, tiling.group)
