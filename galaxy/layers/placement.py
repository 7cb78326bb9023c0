"""Where an activation lives between blocks, and the one collective that moves it.

An activation [B, T, H] is in one of three placements across the tensor group:
    REPLICATE  every rank holds the whole tensor (same values)
    SEQ        every rank holds its own positions along T (the plan's seq_scatter_list)
    PARTIAL    every rank holds a whole-shaped tensor that is one term of a sum (TP block output)

A block of method NONE or TP consumes REPLICATE, SP consumes SEQ. NONE produces REPLICATE,
TP produces PARTIAL, SP produces SEQ. Every layout is this table applied between blocks
(TABLE below; `redistribute` runs it):

    from \\ to block   NONE               TP                     SP
    REPLICATE          -                  copy_to_all            split_scatter
    SEQ                gather_along_dim   all_gather             -
    PARTIAL            all_reduce         all_reduce+copy        reduce_scatter
"""
from galaxy.comm import collectives as C

REPLICATE, SEQ, PARTIAL = "replicate", "seq", "partial"
SEQ_DIM = 1
PRODUCES = {"NONE": REPLICATE, "TP": PARTIAL, "SP": SEQ}

# (placement of x, method of the consuming block) -> collectives of galaxy.comm.collectives, in order
TABLE = {
    (REPLICATE, "NONE"): (),
    (REPLICATE, "TP"): ("copy_to_all",),
    (REPLICATE, "SP"): ("split_scatter",),
    (SEQ, "NONE"): ("gather_along_dim",),
    (SEQ, "TP"): ("all_gather",),
    (SEQ, "SP"): (),
    (PARTIAL, "NONE"): ("all_reduce",),
    (PARTIAL, "TP"): ("all_reduce", "copy_to_all"),
    (PARTIAL, "SP"): ("reduce_scatter",),
}
_SPLIT_ALONG_SEQ = {"split_scatter", "gather_along_dim", "all_gather", "reduce_scatter"}


def redistribute(x, src, method, ctx):
    """Move activation x from placement `src` to what a block of `method` consumes."""
    for name in TABLE[src, method]:
        op = getattr(C, name)
        x = op(x, SEQ_DIM, ctx.plan.positions, ctx.tp_group) if name in _SPLIT_ALONG_SEQ else op(x, ctx.tp_group)
    return x


def consumes(method):
    return SEQ if method == "SP" else REPLICATE
