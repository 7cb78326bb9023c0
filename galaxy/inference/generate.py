"""Greedy decoding with a KV cache, in every layout.

The prompt runs once through the model (prefill), filling each attention's KVCache; each further
step feeds one token per row (decode). The layouts differ only in what a rank keeps and how a step
moves between ranks:

    TP, Galaxy  attention splits heads: a rank caches its own K/V heads of every position. The
                collectives are the training ones, and every rank computes the same logits, so
                every rank picks the same token.
    SP, Galaxy  sequence-parallel blocks split each step's positions: the prompt's in proportion to
                the plan's positions (seq_scatter_list, read as shares), and each new token goes to
                the rank furthest below its share (SequenceSplit). Under SP that rank keeps the
                token's K and V; attention then moves queries and partial results, never the cache
                (galaxy.layers.attention, docs/sp.md).
    pipeline    a stage caches its own layers; hidden states go stage to stage point to point, and
                the last stage broadcasts the chosen tokens to every stage.

`greedy_generate(model, input_ids, max_new_tokens)` returns the same ids on every rank;
`greedy_steps` yields each step's token and logits (the benchmark times prefill and decode with it);
`GrowingSequence` runs a sequence in pieces. `greedy_denoise` decodes BART's output (an
encoder-decoder, without a decoder cache: see there).
"""
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist

from galaxy.layers.attention import Attention, KVCache
from galaxy.layers.transformer import TransformerLayer
from galaxy.pipeline.engine import pipeline_streams
from galaxy.pipeline.p2p import StageLinks


class SequenceSplit:
    """How many of a sequence's positions each rank keeps under sequence-parallel blocks: each next
    position goes to the rank with the smallest (held + 1) / share, the lowest on ties (the greedy
    step of galaxy.planner.split.apportion at cost 1 / share), so every rank's count stays within
    one of its share of the sequence so far. A step's positions lie in rank order."""

    def __init__(self, shares):
        self.shares, self.held = shares, [0] * len(shares)

    def take(self, count):
        """How many of the next `count` positions each rank keeps."""
        sizes = [0] * len(self.shares)
        for _ in range(count):
            rank = min(range(len(sizes)), key=lambda r: ((self.held[r] + 1) / self.shares[r], r))
            self.held[rank] += 1
            sizes[rank] += 1
        return sizes


@contextmanager
def kv_caches(model, enabled=True):
    attentions = [m for m in model.modules() if isinstance(m, Attention)] if enabled else []
    for a in attentions:
        a.kv_cache = KVCache()
    try:
        yield
    finally:
        for a in attentions:
            a.kv_cache = None


@contextmanager
def untiled(model):
    """Steps split positions their own way; a layer's tiles (overlap_tiles) are cut from the plan's."""
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.set_tiles(1)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_tiles(model.config.overlap_tiles)


@contextmanager
def step_positions(ctx, sizes):
    """ctx's plan with this step's positions per rank, for the sequence-parallel blocks to read."""
    plan = ctx.plan
    if plan.seq_sharded:
        ctx.plan = replace(plan, positions=tuple(sizes))
    try:
        yield
    finally:
        ctx.plan = plan


def through_stages(model, run):
    """forward(ids, ...) on this rank's pipeline stage: each of its chunks receives what the previous
    model stage hands on (the first stage's first chunk embeds ids), runs run(ids, ..., hidden_states=
    what it received, chunk=its index) and sends its output on. Returns the output on the last stage,
    None elsewhere."""
    ctx, links = model.ctx, StageLinks(model.ctx)
    widths = [width for width, _ in pipeline_streams(model, model.config.hidden_size)]
    dtype = next(model.parameters()).dtype  # activations travel in the weights' dtype
    chunks = ctx.plan.virtual_stages

    def forward(ids, *args, **kwargs):
        for chunk in range(chunks):  # at least one (virtual_stages >= 1)
            received = None
            if chunk or not ctx.is_first_stage:
                got = links.recv_forward([(*ids.shape, width) for width in widths], dtype)
                received = got[0] if len(got) == 1 else tuple(got)
            out = run(ids, *args, **kwargs, hidden_states=received, chunk=chunk)
            if chunk < chunks - 1 or not ctx.is_last_stage:
                links.send_forward(list(out) if isinstance(out, tuple) else [out])
        links.finish()  # this stage's part ends once the next stage has its input
        return out if ctx.is_last_stage else None
    return forward


class GrowingSequence:
    """A sequence run through the model in pieces, in any layout: each call's tokens come after those
    of the calls before, whose K and V the attentions keep (inside kv_caches(model))."""

    def __init__(self, model):
        self.model, self.length = model, 0
        self.split = SequenceSplit(model.ctx.plan.positions)
        self.forward = through_stages(model, model) if model.ctx.plan.pp_size > 1 else model

    def __call__(self, ids):
        """The logits [B, t, V] of ids' t tokens on the last stage's ranks, else None."""
        with step_positions(self.model.ctx, self.split.take(ids.shape[1])):
            out = self.forward(ids, past_length=self.length)
        self.length += ids.shape[1]
        return out


def next_tokens(logits, ctx, rows):
    """Each row's argmax [rows, 1] on every rank: a pipeline's last stage broadcasts its own."""
    tokens = (logits.argmax(-1, keepdim=True) if ctx.is_last_stage
              else torch.empty((rows, 1), dtype=torch.long, device=ctx.device))
    if ctx.plan.pp_size > 1:
        dist.broadcast(tokens, src=ctx.pp_peer(ctx.plan.pp_size - 1), group=ctx.pp_group)
    return tokens


@torch.no_grad()
def greedy_steps(model, input_ids, max_new_tokens, use_cache=True):
    """For each new token, yield (its ids [B, 1], the same on every rank; the logits [B, V] it is the
    argmax of, on the last stage's ranks, else None). The first step runs the prompt, each further
    step one token. use_cache=False recomputes the whole sequence every step (what the cache must equal)."""
    model.eval()
    ids = input_ids.to(model.ctx.device)
    with kv_caches(model, use_cache), untiled(model):
        cached = GrowingSequence(model)
        for _ in range(max_new_tokens):
            logits = cached(ids[:, cached.length:]) if use_cache else GrowingSequence(model)(ids)
            logits = None if logits is None else logits[:, -1]
            token = next_tokens(logits, model.ctx, ids.shape[0])
            yield token, logits
            ids = torch.cat([ids, token], dim=1)


def greedy_generate(model, input_ids, max_new_tokens, eos_id=None):
    """input_ids [B, T] -> [B, T + up to max_new_tokens] on every rank, in any layout; stops early once
    every row ended in eos."""
    ids = input_ids.to(model.ctx.device)
    for token, _ in greedy_steps(model, ids, max_new_tokens):
        ids = torch.cat([ids, token], dim=1)
        if eos_id is not None and bool((token == eos_id).all()):
            break
    return ids


@torch.no_grad()
def greedy_denoise(model, input_ids, attention_mask, max_new_tokens, start_id, eos_id, bos_id=None):
    """BART: input_ids [B, T] (with attention_mask) -> the decoded ids [B, up to max_new_tokens], the
    same on every rank, in every layout BART runs (not pipeline stages), as transformers'
    BartForConditionalGeneration.generate(do_sample=False, num_beams=1) decodes them with
    decoder_start_token_id start_id, forced_bos_token_id bos_id, forced_eos_token_id = eos_token_id
    = eos_id: the first new token is bos_id (when given), the max_new_tokens-th is eos_id, a row
    that produced eos_id is padded with pad_token_id, and decoding stops once every row has.

    The encoder runs once. There is no KV cache for the decoder: each step reruns it over the tokens
    so far padded to T positions, since the sequence-parallel layouts split the decoder's positions
    as they split the encoder's (cross-attention pairs them), so every step keeps the training
    shape; causal self-attention leaves the positions so far unaffected by the padding after them.
    Hence max_new_tokens <= T."""
    if max_new_tokens > input_ids.shape[1]:
        raise ValueError(f"max_new_tokens {max_new_tokens} exceeds the {input_ids.shape[1]} positions the decoder runs over")
    model.eval()
    ids, mask, pad = input_ids.to(model.ctx.device), attention_mask.to(model.ctx.device), model.config.pad_token_id
    memory = model.model.memory(ids, mask)
    decoded = torch.full_like(ids, pad)
    decoded[:, 0] = start_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for step in range(max_new_tokens):
        if step == max_new_tokens - 1 or (step == 0 and bos_id is not None):  # forced: no logits needed
            token = torch.full_like(done, eos_id if step == max_new_tokens - 1 else bos_id, dtype=torch.long)
        else:
            token = model.lm_head(model.model.decode(decoded, memory)[:, step]).argmax(-1)
        token = token.masked_fill(done, pad)
        new.append(token)
        done |= token == eos_id
        if bool(done.all()):
            break
        decoded[:, step + 1] = token
    return torch.stack(new, dim=1)
