"""Tiled comm/compute overlap (overlap_tiles > 1) gives the unfused Galaxy layouts' numbers."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.comm.overlap import SeqTiles
from galaxy.layers.linear import ColumnLinear, RowLinear
from galaxy.models.bert.model import BertConfig, BertForMaskedLM
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import rel_err, run_ranks

BASE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
SEQ = 13
SPLITS = {2: dict(seq_scatter_list=[8, 5], tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[16, 32]),
          3: dict(seq_scatter_list=[2, 7, 4], tp_num_attention_heads_list=[1, 2, 1],
                  tp_intermediate_size_list=[8, 24, 16])}


def test_tiles_cover_each_ranks_positions_in_order():
    tiles = SeqTiles([8, 5], rank=1, tiles=4)
    assert tiles.sizes == [[2, 2], [2, 1], [2, 1], [2, 1]]
    rows = torch.cat(tiles.index).sort().values
    assert rows.tolist() == list(range(13))
    assert tiles.index[0].tolist() == [0, 1, 8, 9]
    assert [tiles.local[i] for i in range(4)] == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]
    assert SeqTiles([2, 7], rank=0, tiles=4).count == 2  # never more tiles than a rank has positions


def test_shaped_tiles_follow_their_shares_on_every_rank():
    assert SeqTiles([8, 5], rank=0, tiles=[1, 3]).sizes == [[2, 1], [6, 4]]
    assert SeqTiles([64, 64], rank=1, tiles=[1, 2, 4]).sizes == [[9, 9], [18, 18], [37, 37]]
    assert SeqTiles([3, 12], rank=0, tiles=[1, 7]).sizes == [[1, 2], [2, 10]]  # each rank keeps >= 1 a tile
    assert SeqTiles([2, 7], rank=0, tiles=[1, 2, 4]).sizes == [[1, 2], [1, 5]]  # as many as the least rank has
    assert [t.sizes for t in (SeqTiles([5], 0, 2), SeqTiles([5], 0, [1, 1]))] == [[[3], [2]]] * 2


class _WrappedColumn(ColumnLinear):
    """Stands in for a wrapped linear (e.g. LoRA) that the fused path must not bypass."""


class _WrappedRow(RowLinear):
    pass


def _wrapped(model):
    """Tiled model whose linears are subclasses: the blocks fall back to unfused collectives."""
    for m in model.modules():
        for name in ("q", "up", "o", "down"):
            lin = getattr(m, name, None)
            if type(lin) in (ColumnLinear, RowLinear):
                lin.__class__ = _WrappedColumn if type(lin) is ColumnLinear else _WrappedRow
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, BASE["vocab_size"], (2, SEQ), generator=g)
    labels = torch.where(torch.rand(2, SEQ, generator=g) < 0.5, ids, torch.full_like(ids, -100))
    return ids, labels


def _run(model, ids, labels):
    for m in model.modules():
        if hasattr(m, "step_seed"):
            m.step_seed = 7
    model.train()
    loss, _ = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(rank, world):
    """Loss vs serial, and overlap_tiles 4 and [1, 3] (a small first gather tile, a small last scatter
    tile) vs 1 (loss, every gradient) on this rank. The key bias is
    skipped: softmax ignores it, so its gradient is rounding noise (~1e-9) in both runs."""
    ids, labels = _batch()
    serial_loss, _ = _run(BertForMaskedLM(BertConfig(**BASE)), ids, labels)
    out = {}
    for layout in ("galaxy", "galaxy2"):
        cfg = dict(BASE, parallel=layout, seq_length=SEQ, **SPLITS[world])
        if layout == "galaxy2":
            cfg.pop("tp_intermediate_size_list")
        ctx = ParallelContext.create(build_plan(cfg, world), rank)
        models = [BertForMaskedLM(BertConfig(**BASE, overlap_tiles=t), ctx) for t in (1, 4, [1, 3], 4)]
        (loss1, grads1), *tiled = [_run(m, ids, labels) for m in models[:3] + [_wrapped(models[3])]]
        for loss4, grads4 in tiled:
            assert grads1.keys() == grads4.keys()
            out[layout] = out.get(layout, []) + [(rel_err(loss1, serial_loss), rel_err(loss4, loss1), max(
                rel_err(grads4[n], grads1[n]) for n in grads1 if not n.endswith("attn.k.bias")))]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_overlap_matches_unfused(world):
    for rank_result in run_ranks(_compare, world):
        for layout, runs in rank_result.items():
            for vs_serial, loss_err, grad_err in runs:  # fused, shaped, then the wrapped-linear fallback
                assert vs_serial < 1e-5, layout
                assert loss_err < 1e-6, layout
                assert grad_err < 1e-6, layout


LLAMA = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
             max_position_embeddings=32)


def _compare_llama(rank, world):
    """LLaMA (pre-norm, rotary, gated MLP, causal): Galaxy with overlap_tiles 4 vs serial (loss)
    and vs overlap_tiles 1 (loss and every gradient)."""
    ids, labels = _batch()
    serial_loss, _ = _run(LlamaForCausalLM(LlamaConfig(**LLAMA)), ids, labels)
    cfg = dict(LLAMA, model="llama", parallel="galaxy", seq_length=SEQ, **SPLITS[world])
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    untiled, tiled = (LlamaForCausalLM(LlamaConfig(**LLAMA, overlap_tiles=t), ctx) for t in (1, 4))
    assert all(layer.attn.tiling and layer.mlp.tiling for layer in tiled.model.layers.values())  # the fused path ran
    (loss1, grads1), (loss4, grads4) = _run(untiled, ids, labels), _run(tiled, ids, labels)
    assert grads1.keys() == grads4.keys()
    return rel_err(loss4, serial_loss), rel_err(loss4, loss1), max(rel_err(grads4[n], grads1[n]) for n in grads1)


@pytest.mark.parametrize("world", [2, 3])
def test_llama_overlap_matches_serial_and_unfused(world):
    for vs_serial, loss_err, grad_err in run_ranks(_compare_llama, world):
        assert vs_serial < 1e-5 and loss_err < 1e-6 and grad_err < 1e-6
