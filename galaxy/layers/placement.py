"""Where an activation lives between blocks, and the one collective that moves it.

An activation [B, T, H] is in one of three placements across the tensor group:
    REPLICATE  every rank holds the whole tensor (same values)
    SEQ        every rank holds its own positions along T (the plan's seq_scatter_list)
    PARTIAL    every rank holds a whole-shaped tensor that is one term of a sum (TP block output)

A block of method NONE or TP consumes REPLICATE, SP consumes SEQ. NONE produces REPLICATE,
TP produces PARTIAL, SP produces SEQ. Every layout is this table applied between blocks:

    from \\ to block   NONE               TP                     SP
    REPLICATE          -                  copy_to_all            split_scatter
    SEQ                gather_along_dim   all_gather             -
    PARTIAL            all_reduce         all_reduce+copy        reduce_scatter
"""
from galaxy.comm import collectives as C

REPLICATE, SEQ, PARTIAL = "replicate", "seq", "partial"
SEQ_DIM = 1
PRODUCES = {"NONE": REPLICATE, "TP": PARTIAL, "SP": SEQ}


def redistribute(x, src, method, ctx):
    """Move activation x from placement `src` to what a block of `method` consumes."""
    group, sizes = ctx.tp_group, ctx.plan.positions
    if src == REPLICATE:
        if method == "TP":
            return C.copy_to_all(x, group)
        return C.split_scatter(x, SEQ_DIM, sizes, group) if method == "SP" else x
    if src == SEQ:
        if method == "TP":
            return C.all_gather(x, SEQ_DIM, sizes, group)
        return x if method == "SP" else C.gather_along_dim(x, SEQ_DIM, sizes, group)
    if method == "SP":
        return C.reduce_scatter(x, SEQ_DIM, sizes, group)
    x = C.all_reduce(x, group)
    return C.copy_to_all(x, group) if method == "TP" else x


def consumes(method):
    return SEQ if method == "SP" else REPLICATE
