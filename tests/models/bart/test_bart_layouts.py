"""Every layout of BART against the serial model: same seed, weights and batches -> same losses
over 2 optimizer steps and same gradients, at world 2 and 3 with uneven heads, columns and
positions. One spawn per world runs every layout."""
import functools

import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import BartDenoisingData, Tokenizer
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.models.bart.model import to_hf
from galaxy.models.checkpoint import gather_full_state
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks

MODEL = dict(model="bart", hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=2,
             num_decoder_layers=2, vocab_size=8000, seq_length=32, max_position_embeddings=32, batch_size=6,
             gradient_accumulation_steps=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             layer_norm_eps=1e-5, scale_embedding=True, warmup_steps=1, max_grad_norm=1.0, bucket_size_mb=0.01)
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
SPLITS = {2: dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[64, 32], seq_scatter_list=[20, 12]),
          3: dict(tp_num_attention_heads_list=[2, 1, 1], tp_intermediate_size_list=[48, 32, 16],
                  seq_scatter_list=[12, 10, 10])}
# (layout, dropout on): the layouts' dropout masks are drawn layout-invariantly, so they match serial with it on
LAYOUTS = [("tp", False), ("galaxy", False), ("sp", False), ("galaxy2", False), ("dp", False), ("galaxy", True)]


def config(layout, world, dropout=False):
    extra = {} if layout in ("serial", "dp") else SPLITS[world]
    return load_config(None, {**MODEL, **extra, **(DROPOUT if dropout else {}), "parallel": layout})


@functools.lru_cache(maxsize=1)
def corpus(seq_length, seed):
    tok = Tokenizer("data/python_docs/spm_bert.model")
    return BartDenoisingData("data/python_docs/pretrain.jsonl", tok, seq_length, seed)


def _grad(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)  # final_logits_bias is never trained


def train_two_steps(cfg, plan, rank):
    """Losses of 2 optimizer steps and the gradients (full, HF-named) of the second."""
    ctx = ParallelContext.create(plan, rank)
    model = BartForConditionalGeneration(BartConfig.from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, corpus(cfg["seq_length"], cfg["seed"]), total_steps=2, log=lambda m: None)
    grads = {}
    trainer.before_update = lambda: grads.update(gather_full_state(model, ctx, to_hf, _grad))
    losses = [trainer.train_step()["loss"] for _ in range(2)]
    return losses, grads


def _all_layouts(rank, world):
    out = {}
    for layout, dropout in LAYOUTS:
        cfg = config(layout, world, dropout)
        out[layout, dropout] = train_two_steps(cfg, build_plan(cfg, world), rank)
    return out


@pytest.fixture(scope="module")
def serial():
    """Reference results with dropout off and on."""
    out = {}
    for dropout in (False, True):
        cfg = config("serial", 1, dropout)
        out[dropout] = train_two_steps(cfg, build_plan(cfg, 1), 0)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_match_serial(world, serial):
    results = run_ranks(_all_layouts, world, timeout_s=400)
    for rank, per_layout in enumerate(results):
        for (layout, dropout), (losses, grads) in per_layout.items():
            ref_losses, ref_grads = serial[dropout]
            for got, want in zip(losses, ref_losses, strict=True):
                assert abs(got - want) / abs(want) < 1e-5, (layout, dropout, rank, losses, ref_losses)
            assert grads.keys() == ref_grads.keys(), layout
            for name, g in grads.items():
                err = rel_err(g, ref_grads[name])
                assert err < 1e-5, (layout, dropout, rank, name, err)
