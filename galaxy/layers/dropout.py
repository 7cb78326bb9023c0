"""Dropout whose mask does not depend on the layout, at the cost of this rank's share only.

An element of the *full* tensor is kept when a hash of (the mask's key, its index) passes a
threshold that a fraction 1 - p of hashes pass. The key is hashed from (run seed, site, optimizer
step) by galaxy.seeding, and the full tensor is that of the whole step: its batch dimension (dim 0
at every site) holds all the step's samples in the order of the step's global batch (micro-step by
micro-step), and a micro-batch's rows are its samples' positions there (`rows`, set by the
training loop; e.g. batch_size 6 and 2 micro-steps: replica 1 of 2 holds rows 3-5 of the first
micro-step and 9-11 of the second, of 12). A rank evaluates the hash only at the indices it holds,
so a sample draws the same mask whichever replica, micro-step, pipeline micro-batch or tensor
shard holds it: serial, data-parallel (ZeRO too), pipeline and tensor layouts, any
gradient_accumulation_steps over the same samples, and a resumed run with another world, drop
exactly the same elements, and a shard's mask costs its share of the work and no communication.

The hash of index (i_0, ..., i_k): every dimension d of the full shape has a vector w_d of random
int32 words (drawn from the key; its length is that dimension's size, so drawing is cheap), and
sum_d w_d[i_d] (mod 2^32) goes through murmur3's 32-bit finaliser. Of n elements, about
n^2 / 2^33 pairs share a sum and hence a decision (18,000 pairs among the 12.6 M elements of a
[4, 12, 512, 512] mask): harmless for dropout.
"""
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from galaxy.seeding import DEFAULT_SEED, seed_of

_FMIX = ((16, -2048144789), (13, -1028477387))  # murmur3 fmix32's shifts and multipliers 0x85ebca6b, 0xc2b2ae35
_CHUNK = 1 << 17  # elements hashed per pass: the int32 buffers stay in cache


class LayoutInvariantDropout(nn.Module):
    def __init__(self, p, site):
        super().__init__()
        self.p = p
        self.site = site  # an int or a name: the same dropout in every layout
        self.key_by(DEFAULT_SEED, step=0)  # set_dropout_seed keys every micro-batch
        self.part = (0, 1)  # (which, of how many) forwards of the same samples this one is (set_part)

    def key_by(self, seed, step, rows=None, samples=None):
        """Key the mask by (run seed, site, step); the batch dimension's rows are the samples `rows`
        (a range) of the step's `samples` (default: the batch is the step's samples)."""
        self.key = seed_of(seed, "dropout", self.site, step)
        self.rows, self.samples = rows, samples

    def key_state(self):
        return self.key, self.rows, self.samples, self.part

    def set_key_state(self, state):
        self.key, self.rows, self.samples, self.part = state

    def forward(self, x, full_shape=None, index=None):
        """x is the part `index` (a slice per leading dimension) of a tensor of shape full_shape
        (default: x is the whole tensor), whose batch dimension 0 callers leave whole."""
        if not self.training or self.p == 0.0:
            return x
        full_shape, index = tuple(full_shape or x.shape), tuple(index or (slice(None),))
        rows, samples = (self.rows, self.samples) if self.rows is not None else (range(full_shape[0]), full_shape[0])
        # the batch is these rows of the step's samples, in the part-th of `parts` forwards of them
        part, parts = self.part
        start = part * samples + rows.start
        full_shape, index = (parts * samples,) + full_shape[1:], (slice(start, start + len(rows)),) + index[1:]
        return x * self.mask(full_shape, index, x.dtype, x.device)

    def mask(self, full_shape, index, dtype, device):
        """The part `index` of the full tensor's mask, scaled by 1 / (1 - p)."""
        gen = torch.Generator().manual_seed(self.key)
        words = []
        for d, size in enumerate(full_shape):
            w = torch.randint(-2**31, 2**31, (size,), dtype=torch.int32, generator=gen, device="cpu")
            words.append(w[index[d] if d < len(index) else slice(None)].to(device))
        return dropout_mask(words, self.p, dtype)


def dropout_mask(words, p, dtype):
    """The mask [len(w) for w in words]: 1 / (1 - p) where the hash of the index passes a threshold
    that a uniform int32 passes with probability 1 - p, else 0 (scaled, so applying it is one
    multiplication). Hashed a chunk of rows at a time, in buffers that stay in cache."""
    lead = torch.zeros((), dtype=torch.int32, device=words[-1].device)
    for w in words[:-1]:
        lead = lead.unsqueeze(-1) + w  # int32 sums wrap, i.e. are taken mod 2^32
    last, rows = words[-1], lead.reshape(-1, 1)
    mask = torch.empty(len(rows), len(last), dtype=dtype, device=last.device)
    threshold = float(round((2 * p - 1) * 2**31))
    step = max(1, _CHUNK // max(1, len(last)))
    h = torch.empty(min(step, len(rows)), len(last), dtype=torch.int32, device=last.device)
    tmp, u = torch.empty_like(h), torch.empty_like(h, dtype=torch.float32)
    for start in range(0, len(rows), step):
        n = len(rows[start:start + step])
        torch.add(rows[start:start + n], last, out=h[:n])
        _fmix32_(h[:n], tmp[:n])
        # h - threshold is a whole number in float32, so clamping it to [0, 1] gives 1 where
        # h > threshold, else 0 (cheaper than a comparison, whose bool result is slow to convert)
        u[:n].copy_(h[:n]).sub_(threshold).clamp_(0, 1)
        torch.mul(u[:n], 1.0 / (1.0 - p), out=mask[start:start + n])
    return mask.view(lead.shape + last.shape)


def _fmix32_(h, tmp):
    """murmur3's finaliser in place on int32, without its last step (h ^= h >>> 16 leaves the top
    16 bits unchanged, and they alone decide all but 1 in 2^16 threshold tests). Multiplications
    wrap mod 2^32; the shifts are made logical by masking off the sign bits an arithmetic shift
    copies in."""
    for shift, mult in _FMIX:
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp &= (1 << (32 - shift)) - 1
        h ^= tmp
        h *= mult


def set_dropout_seed(model, seed, step, rows=None, samples=None):
    """Key every dropout site's mask for this micro-batch, samples `rows` of the step's `samples`
    (LayoutInvariantDropout.key_by); recomputation (activation checkpointing) then redraws the
    same mask."""
    for m in _sites(model):
        m.key_by(seed, step, rows, samples)


def _sites(model):
    return [m for m in model.modules() if isinstance(m, LayoutInvariantDropout)]


@contextmanager
def set_part(model, part, parts):
    """Forwards inside draw their masks as the part-th of `parts` forwards of the same samples, a
    batch `parts` times the step's: retrieval's questions (part 0 of 2) and their passages (1 of 2)
    run as two forwards of the same rows and must not share masks."""
    sites = _sites(model)
    for m in sites:
        m.part = (part, parts)
    try:
        yield
    finally:
        for m in sites:
            m.part = (0, 1)


def masks_as_in_forward(module):
    """torch.utils.checkpoint's context_fn: the recomputation in backward draws the masks the
    forward drew, though the sites were keyed again in between (set_part, another micro-batch)."""
    drawn = [(m, m.key_state()) for m in _sites(module)]

    @contextmanager
    def recompute():
        now = [(m, m.key_state()) for m, _ in drawn]
        for m, state in drawn:
            m.set_key_state(state)
        try:
            yield
        finally:
            for m, state in now:
                m.set_key_state(state)
    return nullcontext(), recompute()
