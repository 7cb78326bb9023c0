"""Autograd-aware collectives: each forward is paired with its conjugate in backward
(CONJUGATES below).

Every function takes the process group and, where a dimension is split, the list of
per-rank sizes along it, so uneven splits (heterogeneous devices) work. A group of one
rank makes every collective the identity, which is how the serial layout runs.
"""
from collections import namedtuple

import torch
import torch.distributed as dist

from galaxy.comm import stats

# name: (communication in forward, in backward); None = no communication (identity or keep own slice)
CONJUGATES = {
    "copy_to_all": (None, "all_reduce"),
    "all_reduce": ("all_reduce", None),
    "split_scatter": (None, "all_gather"),
    "gather_along_dim": ("all_gather", None),
    "reduce_scatter": ("reduce_scatter", "all_gather"),
    "all_gather": ("all_gather", "reduce_scatter"),
}


class RecordingGroup:
    """A process group that moves nothing: its collectives return correctly shaped (empty)
    results, and stats reports each as a real run would. --explain runs the real model on it."""

    def __init__(self, size, rank):
        self.size, self.rank = (lambda: size), (lambda: rank)  # as ProcessGroup.size() and .rank()


def _world(group):
    return 1 if group is None else group.size()


def _rank(group):
    return 0 if group is None else group.rank()


# --- plain (non-autograd) helpers shared by forward and backward -------------------------

def _all_reduce(x, group):
    if _world(group) == 1:
        return x
    x = x.contiguous()
    with stats.timed("all_reduce", x):
        return Pending(*implementation(group).all_reduce(x, group)).wait()


def _split(x, dim, sizes, group):
    rank = _rank(group)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


class Pending:
    """An asynchronous collective: wait() finishes it and returns the result."""

    def __init__(self, works, finish):
        self.works, self.finish = works, finish

    def wait(self):
        for work in self.works:
            work.wait()
        return self.finish()


# How slices move: each implementation takes the slices along dim 0 (all-reduce: the tensor) and
# returns (works, finish).
#
# On gloo, all-gather and reduce-scatter are direct exchanges with every peer (the bytes sent are
# the ring volumes), every receive posted before any send: gloo stalls a message that arrives
# before its receive is posted, and its reduce_scatter runs a full all-reduce (docs/measurements.md,
# benchmarks/link_collectives.py). Other backends (NCCL) run their native single-tensor
# collectives, which need equal slices: every slice is padded to the longest and trimmed after.


def exchange(sends, recvs, group):
    """Post every irecv, then every isend ((group rank, contiguous tensor) pairs; messages between
    two ranks arrive in the order posted); returns the works. An empty tensor is not sent: both
    sides know its shape (a rank owning no positions of a decode step)."""
    ops = [dist.P2POp(dist.irecv, t, group=group, group_peer=r) for r, t in recvs if t.numel()]
    ops += [dist.P2POp(dist.isend, t, group=group, group_peer=r) for r, t in sends if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def _direct_all_gather(mine, sizes, group):
    rank = _rank(group)
    out = mine.new_empty((sum(sizes),) + mine.shape[1:])
    parts = out.split(sizes)
    parts[rank].copy_(mine)
    peers = [r for r in range(len(sizes)) if r != rank]
    return exchange([(r, mine) for r in peers], [(r, parts[r]) for r in peers], group), lambda: out


def _direct_reduce_scatter(chunks, sizes, group):
    rank = _rank(group)
    peers = [r for r in range(len(sizes)) if r != rank]
    incoming = {r: torch.empty_like(chunks[rank]) for r in peers}
    works = exchange([(r, chunks[r]) for r in peers], incoming.items(), group)
    return works, lambda: sum(incoming.values(), chunks[rank])


def _pad(x, length):
    return torch.cat([x, x.new_zeros((length - x.shape[0],) + x.shape[1:])]) if x.shape[0] < length else x


def _padded_all_gather(mine, sizes, group):
    longest = max(sizes)
    out = mine.new_empty((len(sizes) * longest,) + mine.shape[1:])
    work = dist.all_gather_single(out, _pad(mine, longest), group=group, async_op=True)
    return [work], lambda: torch.cat([out[r * longest: r * longest + n] for r, n in enumerate(sizes)])


def _padded_reduce_scatter(chunks, sizes, group):
    longest = max(sizes)
    out = chunks[0].new_empty((longest,) + chunks[0].shape[1:])
    work = dist.reduce_scatter_single(out, torch.cat([_pad(c, longest) for c in chunks]), group=group, async_op=True)
    return [work], lambda: out[:sizes[_rank(group)]]


def _native_all_reduce(x, group):
    return [dist.all_reduce(x, group=group, async_op=True)], lambda: x


def _recorded_all_gather(mine, sizes, group):
    return [], lambda: mine.new_empty((sum(sizes),) + mine.shape[1:])


def _recorded_reduce_scatter(chunks, sizes, group):
    return [], lambda: chunks[_rank(group)].clone()  # a sum of its own, as a real one: no view holding the input


Implementation = namedtuple("Implementation", "all_gather reduce_scatter all_reduce")
DIRECT = Implementation(_direct_all_gather, _direct_reduce_scatter, _native_all_reduce)
PADDED = Implementation(_padded_all_gather, _padded_reduce_scatter, _native_all_reduce)
RECORDED = Implementation(_recorded_all_gather, _recorded_reduce_scatter, lambda x, group: ([], lambda: x))
BY_BACKEND = {"gloo": DIRECT}  # any other backend: PADDED; a RecordingGroup: RECORDED
_chosen = {}  # process group -> (all_gather, reduce_scatter, all_reduce)


def implementation(group, choice=None):
    """The (all_gather, reduce_scatter, all_reduce) `group` uses: `choice` if given (tests, benchmarks),
    else its backend's, looked up once, at the group's first collective."""
    if choice is not None:
        _chosen[group] = choice
    if group not in _chosen:
        recording = isinstance(group, RecordingGroup)
        _chosen[group] = RECORDED if recording else BY_BACKEND.get(dist.get_backend(group), PADDED)
    return _chosen[group]


def start_all_gather(x, dim, sizes, group):
    """Start concatenating every rank's slice along `dim` (uneven sizes allowed)."""
    works, finish = implementation(group).all_gather(x.movedim(dim, 0).contiguous(), sizes, group)
    return Pending(works, lambda: finish().movedim(0, dim).contiguous())


def start_reduce_scatter(x, dim, sizes, group):
    """Start summing over ranks, each rank keeping its own slice along `dim` (uneven sizes allowed)."""
    chunks = [c.contiguous() for c in x.movedim(dim, 0).split(sizes)]
    works, finish = implementation(group).reduce_scatter(chunks, sizes, group)
    return Pending(works, lambda: finish().movedim(0, dim).contiguous())


def _all_gather(x, dim, sizes, group):
    if _world(group) == 1:
        return x
    with stats.timed("all_gather", x):
        return start_all_gather(x, dim, sizes, group).wait()


def _reduce_scatter(x, dim, sizes, group):
    if _world(group) == 1:
        return x
    with stats.timed("reduce_scatter", x):
        return start_reduce_scatter(x, dim, sizes, group).wait()


# --- autograd functions ---------------------------------------------------------------

def _pair(name, forward_op, backward_op, doc):
    """An autograd Function: forward_op(x, *args) in forward, its conjugate backward_op(grad, *args) in
    backward; args are the group, after the split dimension and its sizes where there is one."""

    def forward(ctx, x, *args):
        ctx.args = args
        return forward_op(x, *args)

    def backward(ctx, grad):
        return backward_op(grad, *ctx.args), *(None for _ in ctx.args)

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


def _identity(x, group):
    return x


def _summed(x, group):
    return _all_reduce(x.clone(), group)  # _all_reduce sums in place: a copy, not the tensor autograd passed


_CopyToAll = _pair("_CopyToAll", _identity, _summed,
                   "Identity in forward; all-reduce in backward (each rank's partial gradient sums).")
_AllReduce = _pair("_AllReduce", _summed, _identity,
                   "All-reduce (sum of partial results) in forward; identity in backward.")
_SplitScatter = _pair("_SplitScatter", _split, _all_gather,
                      "Keep this rank's slice in forward; all-gather the slices' gradients in backward.")
_GatherAlongDim = _pair("_GatherAlongDim", _all_gather, _split,
                        "All-gather in forward; keep this rank's slice of the gradient in backward. Use it "
                        "when every rank consumes the gathered tensor identically (replicated work).")
_ReduceScatter = _pair("_ReduceScatter", _reduce_scatter, _all_gather,
                       "Reduce-scatter in forward; all-gather in backward.")
_AllGather = _pair("_AllGather", _all_gather, _reduce_scatter,
                   "All-gather in forward; reduce-scatter in backward. Use it when each rank consumes the "
                   "gathered tensor differently (its own heads/columns), so gradients are partial.")


def _check_sizes(x, dim, sizes, group, full):
    world = _world(group)
    if len(sizes) != world:
        raise ValueError(f"sizes {list(sizes)} has {len(sizes)} entries for a group of {world} ranks")
    expected = sum(sizes) if full else sizes[_rank(group)]
    if x.shape[dim] != expected:
        raise ValueError(f"tensor has {x.shape[dim]} along dim {dim}, sizes {list(sizes)} expect {expected}")


def copy_to_all(x, group):
    return _CopyToAll.apply(x, group)


def all_reduce(x, group):
    return _AllReduce.apply(x, group)


def split_scatter(x, dim, sizes, group):
    _check_sizes(x, dim, sizes, group, full=True)
    return _SplitScatter.apply(x, dim, list(sizes), group)


def gather_along_dim(x, dim, sizes, group):
    _check_sizes(x, dim, sizes, group, full=False)
    return _GatherAlongDim.apply(x, dim, list(sizes), group)


def reduce_scatter(x, dim, sizes, group):
    _check_sizes(x, dim, sizes, group, full=True)
    return _ReduceScatter.apply(x, dim, list(sizes), group)


def all_gather(x, dim, sizes, group):
    _check_sizes(x, dim, sizes, group, full=False)
    return _AllGather.apply(x, dim, list(sizes), group)
