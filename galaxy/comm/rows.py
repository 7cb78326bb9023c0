"""Who holds which rows of a full tensor and who wants which (`Rows`): the one description every
move of shards builds. A wanted row comes from the wanting rank itself when it holds it, else from
the first holder that does (`pieces`), so holders may overlap and every rank derives the same moves.
Two transports: `send_rows`, point to point between live ranks (re-planning and elastic recovery:
galaxy.reshard.relayout; gather_full_state), and `read_rows`, slices of safetensors files (resume in
another layout, Hugging Face loading); `share_rows` is the one small all-gather of every rank's
ranges. A parameter's ranges come from its ParamSpec (galaxy.layers.param_spec.span).
"""
from dataclasses import dataclass
from itertools import pairwise

import torch

from galaxy.comm import collectives as C

@dataclass(frozen=True)
class Rows:
    """A full tensor's rows along `dim` (-1: never split) that holder h has (held[h]) and rank r wants (wanted[r])."""
    dim: int
    held: tuple
    wanted: tuple

    @property
    def in_place(self):  # every rank holds exactly the rows it wants: nothing moves
        return self.dim < 0 or self.held == self.wanted


def pieces(held, lo, hi, own=None):
    """[(holder, lo, hi)] covering the rows [lo, hi) some holder has, in order: holder `own`'s rows
    where it has them, else the first holder's that does (rows no holder has are left out)."""
    order = sorted(range(len(held)), key=lambda h: h != own)
    cuts = sorted({lo, hi} | {x for bounds in held for x in bounds if lo < x < hi})
    out = []
    for start, end in pairwise(cuts):  # no holder's range begins or ends inside
        holder = next((h for h in order if held[h][0] <= start < held[h][1]), None)
        if out and holder == out[-1][0] and start == out[-1][2]:
            out[-1] = (holder, out[-1][1], end)
        elif holder is not None:
            out.append((holder, start, end))
    return out


def share_rows(ctx, dims, ranges):
    """[Rows] of tensors split along `dims` over ctx's tensor group, from this rank's (held, wanted)
    range of each: one small all-gather, so every rank moves the same tensors the same way."""
    mine = torch.tensor([[*held, *wanted] for held, wanted in ranges], dtype=torch.long, device=ctx.device)
    every = C.gather_along_dim(mine.view(1, len(ranges), 4), 0, [1] * ctx.tp_size, ctx.tp_group).tolist()
    return [Rows(dim, tuple(tuple(r[i][:2]) for r in every), tuple(tuple(r[i][2:]) for r in every))
            for i, dim in enumerate(dims)]


def send_rows(out, x, rows, rank, group):
    """Point to point: fill `out`, the rows rows.wanted[rank] of a full tensor, from every group
    rank's `x` (rank r's holds rows.held[r]; x may be None where it holds none). Not autograd.
    Returns (rows copied from this rank's own x, rows received)."""
    mine, x = out.movedim(rows.dim, 0), None if x is None else x.movedim(rows.dim, 0)
    sends, recvs, kept, base = [], [], 0, rows.wanted[rank][0]
    for peer, wanted in enumerate(rows.wanted):
        for holder, lo, hi in pieces(rows.held, *wanted, own=peer):
            if holder == rank:
                part = x[lo - rows.held[rank][0]: hi - rows.held[rank][0]]
                if peer == rank:
                    mine[lo - base: hi - base], kept = part, kept + hi - lo
                else:
                    sends.append((peer, part.contiguous()))
            elif peer == rank:
                recvs.append((holder, lo - base, mine.new_empty((hi - lo,) + mine.shape[1:])))
    for work in C.exchange(sends, [(holder, buffer) for holder, _, buffer in recvs], group):
        work.wait()
    for _, at, buffer in recvs:
        mine[at: at + len(buffer)] = buffer
    return kept, sum(len(buffer) for _, _, buffer in recvs)


def read_rows(view, held, dim, lo, hi):
    """From files: rows [lo, hi) along `dim` (None: all) of a full tensor, read from the safetensors
    slices view(h) of its holders h (rows held[h]). LookupError(row): the first row none holds."""
    if dim is None:
        return _read(view(0), None, 0, 0)
    parts, pos = [], lo
    for holder, start, end in pieces(held, lo, hi):
        if start != pos:
            break
        parts.append(_read(view(holder), dim, start - held[holder][0], end - held[holder][0]))
        pos = end
    if pos != hi:
        raise LookupError(pos)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _read(view, dim, lo, hi):
    index = [slice(None)] * len(view.get_shape())
    if dim is not None:
        index[dim] = slice(lo, hi)
    return view[tuple(index)]
