"""Where an activation lives between blocks, and the one collective that moves it.

An activation [B, T, H] is in one of three placements across the tensor group:
    REPLICATE  every rank holds the whole tensor (same values)
    SEQ        every rank holds its own positions along T (the plan's seq_scatter_list)
    PARTIAL    every rank holds a whole-shaped tensor that is one term of a sum (TP block output)

A block of method NONE or TP consumes REPLICATE, SP consumes SEQ. NONE produces REPLICATE,
TP produces PARTIAL, SP produces SEQ. Every layout is TABLE below applied between blocks
(`redistribute` runs it)."""
from enum import Enum

from galaxy.comm import collectives as C
from galaxy.plan import Method

SEQ_DIM = 1


class Placement(Enum):
    REPLICATE, SEQ, PARTIAL = "replicate", "seq", "partial"


REPLICATE, SEQ, PARTIAL = Placement
PRODUCES = {Method.NONE: REPLICATE, Method.TP: PARTIAL, Method.SP: SEQ}

# (placement of x, method of the consuming block) -> the collectives that move x, in order
TABLE = {
    (REPLICATE, Method.NONE): (),
    (REPLICATE, Method.TP): (C.copy_to_all,),
    (REPLICATE, Method.SP): (C.split_scatter,),
    (SEQ, Method.NONE): (C.gather_along_dim,),
    (SEQ, Method.TP): (C.all_gather,),
    (SEQ, Method.SP): (),
    (PARTIAL, Method.NONE): (C.all_reduce,),
    (PARTIAL, Method.TP): (C.all_reduce, C.copy_to_all),
    (PARTIAL, Method.SP): (C.reduce_scatter,),
}
_ALONG_SEQ = (C.split_scatter, C.gather_along_dim, C.all_gather, C.reduce_scatter)


def redistribute(x, src, method, ctx):
    """Move activation x from placement `src` to what a block of `method` consumes."""
    for op in TABLE[src, method]:
        x = op(x, SEQ_DIM, ctx.plan.positions, ctx.tp_group) if op in _ALONG_SEQ else op(x, ctx.tp_group)
    return x


def consumes(method):
    return SEQ if method is Method.SP else REPLICATE
