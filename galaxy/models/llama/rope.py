"""Rotary position embedding (RoPE) and the scalings Hugging Face LLaMA checkpoints use.

Feature i and i + d/2 of a head form a pair, turned by the angle position * w_i, with
w_i = rope_theta^(-2i/d) for plain RoPE. The scalings stretch a trained context window:
    linear   every w_i / factor (position p turns as p / factor did in training)
    dynamic  NTK-aware: once the sequence is longer than max_position_embeddings (L), rope_theta
             grows to theta * (factor * T / L - (factor - 1))^(d / (d - 2)) for a sequence of T
    llama3   w_i kept where its wavelength 2 pi / w_i < original_max_position_embeddings /
             high_freq_factor, divided by factor where it is > original / low_freq_factor,
             and blended linearly in 1 / wavelength in between
These are transformers' formulas (transformers/modeling_rope_utils.py), in the same order of
operations, so checkpoints it wrote give its logits.
"""
import math

import torch
from torch import nn


def inv_freq(cfg, seq_len):
    """The w_i of cfg's RoPE for a sequence of seq_len positions (only dynamic depends on it)."""
    d, theta = cfg.head_dim, cfg.rope_theta
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic":
        factor, trained = scaling["factor"], cfg.max_position_embeddings
        theta = theta * (factor * max(seq_len, trained) / trained - (factor - 1)) ** (d / (d - 2))
    w = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if kind == "linear":
        return w / scaling["factor"]
    if kind == "llama3":
        return _llama3(w, scaling)
    return w


def _llama3(w, s):
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    trained = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / w
    scaled = torch.where(wavelength > trained / low, w / factor, w)
    smooth = (trained / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= trained / high) & (wavelength <= trained / low)
    return torch.where(between, blended, scaled)


class Rotary(nn.Module):
    """RoPE in the Hugging Face layout. Called with the *global* positions of x's rows, so a
    sequence shard is rotated exactly as in the full sequence, and with the length of the
    sequence so far, which dynamic scaling depends on. Like transformers' generate, a KV cache
    keeps keys rotated with the frequencies of the step that computed them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dynamic = cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "dynamic"
        self.register_buffer("inv_freq", inv_freq(cfg, cfg.max_position_embeddings), persistent=False)

    def forward(self, x, positions, seq_len):
        """x [B, heads, t, d]; positions: a range of t global positions in a sequence of seq_len."""
        w = self.inv_freq
        if self.dynamic and seq_len > self.cfg.max_position_embeddings:
            w = inv_freq(self.cfg, seq_len).to(x.device)
        pos = torch.arange(positions.start, positions.stop, device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, w)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
