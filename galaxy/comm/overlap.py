"""Tile-based overlap of communication with computation (Galaxy, INFOCOM'24, Sec. IV-C).

Between sequence-parallel blocks a tensor-parallel block is bracketed by collectives:
all-gather the sequence -> column linears ... row linear -> reduce-scatter the sequence.
Fused here, the sequence is cut into tiles so the network works on one tile while the
CPU multiplies another:

    gather_linear          fwd  all-gather tiles i+1.. (async) while tile i's rows go through the linears
                           bwd  reduce-scatter tile i's input gradient (async) while tile i+1's is computed
    linear_reduce_scatter  fwd  reduce-scatter tile i's output rows (async) while tile i+1's are computed
                           bwd  all-gather tiles i+1..'s output gradient (async) while tile i's input gradient is computed

Tiles follow the per-rank split: each rank cuts *its own* positions into `count` tiles, and
tile i is the concatenation, in rank order, of every rank's i-th piece (uneven sizes work).
The results equal the unfused collective + linear up to float summation order; the bytes
moved are the same.

Tiles need not be even (`overlap_tiles: [1, 3]`, shares of each rank's positions). Only the first
all-gather and the last reduce-scatter cannot hide, so when compute outruns the link a small first
gather tile and a small last scatter tile hide more with fewer messages, each of which has a fixed
cost (docs/galaxy.md, "What a tile costs"): a block gathers in the shares' order and scatters in the
reverse, and a backward pass, whose collective is the other one, takes its tiles in reverse too.
"""
import time

import torch
import torch.nn.functional as F

from galaxy.comm import collectives as C
from galaxy.comm import stats


def tile_shares(tiles):
    """overlap_tiles as relative tile sizes: 4 -> [1, 1, 1, 1]; a list is its own shares."""
    return [1] * tiles if isinstance(tiles, int) else list(tiles)


def parse_tiles(text):
    """A command line's overlap_tiles: "4" -> 4, "1,3" -> [1, 3] (relative sizes)."""
    sizes = [int(part) for part in text.split(",")]
    if min(sizes) < 1:
        raise ValueError(f"tiles {text!r}: each must be at least 1")
    return sizes[0] if len(sizes) == 1 else sizes


def tiles_name(tiles):
    """overlap_tiles as parse_tiles reads it: 4 -> "4", [1, 3] -> "1,3"."""
    return ",".join(map(str, [tiles] if isinstance(tiles, int) else tiles))


def simplest_first(tiles):
    """overlap_tiles candidates ordered by their messages, even before shaped: 1, 2, [1, 3], 4."""
    return sorted(tiles, key=lambda t: (len(tile_shares(t)), not isinstance(t, int)))


def _pieces(n, shares):
    """n positions cut into contiguous pieces in proportion to `shares`, each >= 1 (position by
    position to the piece furthest below its share; equal shares: the first n % count one longer)."""
    ideal = [n * s / sum(shares) for s in shares]
    pieces = [min(n, 1)] * len(shares)
    for _ in range(n - sum(pieces)):
        pieces[max(range(len(pieces)), key=lambda i: ideal[i] - pieces[i])] += 1
    return pieces


class SeqTiles:
    """Tile geometry for per-rank sequence sizes `positions` as seen by rank `rank`; `tiles` is
    overlap_tiles (a count or the tiles' relative sizes, in order)."""

    def __init__(self, positions, rank, tiles):
        shares = tile_shares(tiles)[:max(1, min(positions))]  # every rank keeps >= 1 position per tile
        self.count = len(shares)
        per_rank = [_pieces(n, shares) for n in positions]
        self.total = sum(positions)
        self.sizes, self.index, self.local = [], [], []
        for i in range(self.count):
            sizes = [pieces[i] for pieces in per_rank]
            rows = []
            for r, pieces in enumerate(per_rank):
                start = sum(positions[:r]) + sum(pieces[:i])
                rows.extend(range(start, start + pieces[i]))
            mine = sum(per_rank[rank][:i])
            self.sizes.append(sizes)
            self.index.append(torch.tensor(rows))            # global rows of tile i, rank order
            self.local.append(slice(mine, mine + sizes[rank]))  # this rank's rows of tile i, locally


class _Tile:
    """One tile's collective in flight. wait() records its bytes with the time the caller was blocked
    in it: the part of the tile's communication that compute did not hide (--trace_dir's comm lane)."""

    def __init__(self, kind, x, pending):
        self.kind, self.x, self.pending = kind, x, pending

    def wait(self):
        start = time.perf_counter()
        out = self.pending.wait()
        stats.record(self.kind, self.x, None, start, time.perf_counter() - start)
        return out


def _start_all_gather(x, sizes, group):
    return _Tile("all_gather", x, C.start_all_gather(x, 1, sizes, group))


def _start_reduce_scatter(x, sizes, group):
    return _Tile("reduce_scatter", x, C.start_reduce_scatter(x, 1, sizes, group))


def _start_tile_gathers(x, tiles, group, order):
    """Post every tile's all-gather of this rank's shard x at once, in `order`: the link streams
    them back to back while the caller computes on each as it arrives. {tile: its pending gather}."""
    return {i: _start_all_gather(x[:, tiles.local[i]], tiles.sizes[i], group) for i in order}


class _GatherLinear(torch.autograd.Function):
    """linears(all_gather(x)) for x = this rank's sequence shard [B, t, H]; params = (w0, b0, w1, b1, ...)."""

    @staticmethod
    def forward(ctx, x, tiles, group, *params):
        weights, biases = params[0::2], params[1::2]
        full = x.new_empty(x.shape[0], tiles.total, x.shape[2])  # kept for the weight gradients
        outs = [x.new_empty(x.shape[0], tiles.total, w.shape[0]) for w in weights]
        pending = _start_tile_gathers(x, tiles, group, range(tiles.count))
        for i in range(tiles.count):
            xi = pending[i].wait()
            full.index_copy_(1, tiles.index[i], xi)
            for out, w, b in zip(outs, weights, biases, strict=True):
                out.index_copy_(1, tiles.index[i], F.linear(xi, w, b))
        ctx.save_for_backward(full, *weights)
        ctx.tiles, ctx.group, ctx.has_bias = tiles, group, [b is not None for b in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        full, *weights = ctx.saved_tensors
        tiles = ctx.tiles
        pending = {}
        for i in reversed(range(tiles.count)):  # the forward's first (small) gather tile scatters last
            gx = sum(g.index_select(1, tiles.index[i]) @ w for g, w in zip(grads, weights, strict=True))
            pending[i] = _start_reduce_scatter(gx, tiles.sizes[i], ctx.group)
        flat_x = full.flatten(0, 1)
        param_grads = []
        for g, has_bias in zip(grads, ctx.has_bias, strict=True):  # weight gradients while the last tiles travel
            flat_g = g.flatten(0, 1)
            param_grads += [flat_g.t() @ flat_x, flat_g.sum(0) if has_bias else None]
        grad_x = torch.cat([pending[i].wait() for i in range(tiles.count)], dim=1)
        return (grad_x, None, None, *param_grads)


class _LinearReduceScatter(torch.autograd.Function):
    """reduce_scatter(linear(h)) along the sequence for a row-parallel linear's input h [B, T, k]."""

    @staticmethod
    def forward(ctx, h, tiles, group, weight, bias):
        pending = [_start_reduce_scatter(F.linear(h.index_select(1, tiles.index[i]), weight, bias),
                                         tiles.sizes[i], group) for i in range(tiles.count)]
        ctx.save_for_backward(h, weight)
        ctx.tiles, ctx.group, ctx.has_bias = tiles, group, bias is not None
        return torch.cat([p.wait() for p in pending], dim=1)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        tiles = ctx.tiles
        g_full = grad.new_empty(grad.shape[0], tiles.total, grad.shape[2])
        grad_h = torch.empty_like(h)
        order = reversed(range(tiles.count))  # the forward's last (small) scatter tile gathers first
        pending = _start_tile_gathers(grad, tiles, ctx.group, order)
        for i, gather in pending.items():
            gi = gather.wait()
            g_full.index_copy_(1, tiles.index[i], gi)
            grad_h.index_copy_(1, tiles.index[i], gi @ weight)
        flat_g = g_full.flatten(0, 1)
        grad_w = flat_g.t() @ h.flatten(0, 1)
        return grad_h, None, None, grad_w, flat_g.sum(0) if ctx.has_bias else None


def gather_linear(x, weights, biases, tiles, group):
    """[F.linear(all_gather(x, seq), w, b) for each (w, b)], tiled; x is this rank's shard [B, t, H]."""
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return list(_GatherLinear.apply(x, tiles, group, *params))


def linear_reduce_scatter(h, weight, bias, tiles, group):
    """reduce_scatter(F.linear(h, weight, bias), seq), tiled; returns this rank's shard [B, t, out]."""
    return _LinearReduceScatter.apply(h, tiles, group, weight, bias)
