"""Self-attention over the heads and query positions this rank owns.

    NONE  all heads, all positions                    -> output REPLICATE
    TP    heads ctx.heads (GQA: whole KV groups)      -> output PARTIAL (row-parallel o)
    SP    all heads, queries at ctx.positions; K and V of every position are all-gathered
          (backward: reduce-scatter, since every rank's queries used them) -> output SEQ

For generation, `kv_cache` (a KVCache, set by the generator) keeps K and V of earlier tokens, and
the new tokens sit at positions after them. Under TP a rank keeps its own heads of every position;
under SP every head of its own positions, and once the cache holds tokens a rank's new queries are
answered without moving it: every rank attends all new queries to the keys it keeps, and each
query's rank combines those partial softmaxes (`_attend_kept`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from galaxy.comm import collectives as C
from galaxy.layers.dropout import LayoutInvariantDropout
from galaxy.layers.linear import ColumnLinear, RowLinear
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.tiling import column_in, row_out
from galaxy.plan import Method


class KVCache:
    """What one attention layer keeps of the tokens seen so far: K and V [B, kv_heads, n, d] (after
    the rotary) and their global positions [n]; `length` counts the sequence's positions on every
    rank (under SP a rank keeps only some of them)."""

    def __init__(self):
        self.k = self.v = self.positions = None
        self.length = 0

    def append(self, k, v, rows, new):
        """Keep k, v of global positions `rows`, from a step that added `new` positions in all;
        returns everything kept: (k, v, positions)."""
        positions = torch.arange(rows.start, rows.stop, device=k.device)
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            positions = torch.cat([self.positions, positions])
        self.k, self.v, self.positions = k, v, positions
        self.length += new
        return k, v, positions


def _scaled(owned, factor):
    return range(owned.start * factor, owned.stop * factor)


class Attention(nn.Module):
    def __init__(self, hidden, num_heads, method, ctx, *, num_kv_heads=None, bias=True, dropout_p=0.0,
                 site=0, rotary=None, head_dim=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        self.method, self.ctx, self.rotary = method, ctx, rotary
        self.head_dim = head_dim or hidden // num_heads
        heads = ctx.heads if method is Method.TP else range(num_heads)
        kv_heads = ctx.kv_heads if method is Method.TP else range(num_kv_heads)
        self.heads, self.num_heads, self.n_local, self.kv_local = heads, num_heads, len(heads), len(kv_heads)
        q_dim, kv_dim = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.q = ColumnLinear(hidden, _scaled(heads, self.head_dim), q_dim, bias)
        self.k, self.v = (ColumnLinear(hidden, _scaled(kv_heads, self.head_dim), kv_dim, bias) for _ in range(2))
        self.o = RowLinear(_scaled(heads, self.head_dim), q_dim, hidden, bias,
                           owns_bias=method is not Method.TP or ctx.tp_rank == 0)
        if method is Method.SP:
            set_spec(*self.parameters(), grad_sum=GradSum.STAGE)
        self.dropout = LayoutInvariantDropout(dropout_p, site)
        self.tiling = None  # set by TransformerLayer when overlap_tiles > 1 (galaxy.layers.tiling)
        self.kv_cache = None

    def forward(self, x, attn_bias=None, kv_input=None):
        """x [B, t, H]; attn_bias additive, broadcastable to [B, heads, T, T_kv] over *all* positions.
        Keys and values come from x, or for cross-attention from kv_input (in x's placement)."""
        if kv_input is None:
            q, k, v = column_in(x, (self.q, self.k, self.v), self.tiling)
        else:  # cross-attention runs untiled (the tiling fuses only a block's own input gather)
            q, k, v = self.q(x), self.k(kv_input), self.v(kv_input)
        B, t = q.shape[:2]  # t: the positions attended from (all of them when the input was gathered)
        q, k, v = (h.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for h in (q, k, v))  # [B, heads, t, d]
        cache = self.kv_cache
        past = 0 if cache is None else cache.length
        new = sum(self.ctx.plan.positions) if self.method is Method.SP else t  # this step's positions, all ranks
        own = self.ctx.positions if self.method is Method.SP else range(new)  # the queries' offsets in it
        rows = range(past + own.start, past + own.stop)
        seq_len = past + new  # the sequence so far: dynamic RoPE scales with it
        if self.rotary is not None:
            q, k = self.rotary(q, rows, seq_len), self.rotary(k, rows, seq_len)
        if cache is not None:
            kept = cache.append(k, v, rows, new)
            if self.method is not Method.SP:
                k, v = kept[:2]
            elif past:  # every earlier position is kept by some rank
                out = self._attend_kept(q, *kept, past, own)
                return row_out(out.transpose(1, 2).reshape(B, t, self.n_local * self.head_dim), self.o, self.tiling)
        if self.method is Method.SP:
            k, v = (C.all_gather(h, 2, self.ctx.plan.positions, self.ctx.tp_group) for h in (k, v))
        k, v = self._shared(k), self._shared(v)
        if attn_bias is not None and attn_bias.shape[-2] > 1:
            attn_bias = attn_bias[..., rows.start:rows.stop, :]
        out = self._attend(q, k, v, attn_bias, (B, self.num_heads, seq_len, k.shape[2]), rows)
        return row_out(out.transpose(1, 2).reshape(B, t, self.n_local * self.head_dim), self.o, self.tiling)

    def _shared(self, kv):
        """Grouped-query attention: each KV head serves its group of query heads."""
        return kv if self.kv_local == self.n_local else kv.repeat_interleave(self.n_local // self.kv_local, dim=1)

    def _attend_kept(self, q, k, v, kept, past, own):
        """SP after the prompt: this rank keeps k, v [B, kv, n, d] of global positions `kept`. Every
        rank's new queries (global positions past + 0, 1, ...) are gathered; each rank attends all of
        them to its own keys, giving per query the log of its softmax denominator (-inf: no key of
        this rank visible) and its normalised output; these partials are gathered and each rank
        weights them by softmax over ranks for its own queries (`own`: their offsets in the step)."""
        sizes, group = self.ctx.plan.positions, self.ctx.tp_group
        queries = C.all_gather(q, 2, sizes, group)
        asked = torch.arange(past, past + queries.shape[2], device=q.device)
        scores = queries @ self._shared(k).transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(kept[None, :] > asked[:, None], float("-inf"))  # causal among new tokens
        log_sum = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = (scores - log_sum.clamp_min(torch.finfo(scores.dtype).min)).exp()  # 0, not nan, when none visible
        partial = torch.cat([probs @ self._shared(v), log_sum], dim=-1)[None]
        partials = C.all_gather(partial, 0, [1] * len(sizes), group)[..., own.start:own.stop, :]
        weights = torch.softmax(partials[..., -1:], dim=0)
        return (weights * partials[..., :-1]).sum(0)

    def _attend(self, q, k, v, attn_bias, full_shape, rows):
        if not self.training or self.dropout.p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        # Explicit softmax so the probabilities' dropout mask is layout-invariant.
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if attn_bias is not None:
            scores = scores + attn_bias
        index = (slice(None), slice(self.heads.start, self.heads.stop), slice(rows.start, rows.stop), slice(None))
        probs = self.dropout(torch.softmax(scores, dim=-1), full_shape, index)
        return probs @ v
