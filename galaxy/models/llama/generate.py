"""Greedy decoding with a KV cache, serial or tensor-parallel.

The prompt runs once through the model, filling every attention's cache with its K and V
heads (under TP each rank caches only its own heads); each further step feeds one token.
TP needs nothing else: the all-reduces after attention and MLP are the training ones, and
every rank computes the same logits, so every rank picks the same next token.
"""
from contextlib import contextmanager

import torch

from galaxy.layers.attention import Attention, KVCache


def check_can_generate(plan):
    """One new token cannot be split over positions, and no pipeline schedule drives decoding."""
    if plan.seq_sharded or plan.pp_size > 1:
        raise ValueError(f"generation runs serial or tensor-parallel (TP attention and MLP), "
                         f"not this plan: {plan.describe()}")


@contextmanager
def kv_caches(model):
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    for a in attentions:
        a.kv_cache = KVCache()
    try:
        yield
    finally:
        for a in attentions:
            a.kv_cache = None


@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens, eos_id=None):
    """input_ids [B, T] -> [B, T + up to max_new_tokens]; stops early once every row ended in eos."""
    check_can_generate(model.ctx.plan)
    model.eval()
    ids, new = input_ids, input_ids
    with kv_caches(model):
        for _ in range(max_new_tokens):
            logits = model(new, past_length=ids.shape[1] - new.shape[1])
            new = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
            if eos_id is not None and bool((new == eos_id).all()):
                break
    return ids
