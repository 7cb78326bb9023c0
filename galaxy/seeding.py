"""Where every random stream of a run comes from.

A stream is named by words such as (run seed, purpose, parameter name or dropout site, step,
sample index); its seed is a 64-bit hash of them, so streams of different purposes, names or
steps never share a seed, and the same words name the same stream in every process and
layout. The hash is blake2b of the words' repr: Python's own hash() of a str changes from
process to process (PYTHONHASHSEED), and a sum of character codes collides.
"""
import hashlib

import torch

DEFAULT_SEED = 42  # the config's `seed` when none is given


def seed_of(*words):
    """A 64-bit seed from ints and strings: equal words give equal seeds, any change another one."""
    text = repr(tuple(w if isinstance(w, str) else int(w) for w in words))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def generator(*words):
    """A CPU torch.Generator drawing the stream these words name."""
    return torch.Generator().manual_seed(seed_of(*words))
