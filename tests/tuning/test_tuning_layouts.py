"""Every tuning method in every layout against the serial model: same loss, same gradients of
the trainable parameters (rel. error < 1e-5, fp32), uneven heads / columns / positions.

One spawn per world runs every (method, layout) case; ranks rebuild the ParallelContext per case.
Dropout (hidden, attention and LoRA's) is on; a DP replica keys its masks by its samples' rows
of the batch, as the training loop does. Trainable parameters that start at zero (lora_B, adapter_up,
side_upsample) get seeded nonzero values, so the gradients of the other factor are not trivially 0.
"""
import zlib

import pytest
import torch
from safetensors.torch import load_file

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.layers.dropout import set_dropout_seed
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.bert.model import mlm_to_hf
from galaxy.models.checkpoint import full_shape, own_slice
from galaxy.plan import build_plan
from galaxy.train.grad_sync import GradSync
from galaxy.train.loop import replica_rows
from galaxy.tuning.apply import apply_tuning
from tests.helpers import grad_err, run_ranks, seeded

MODEL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
             seq_length=10, max_position_embeddings=16, lora_dim=4, lora_alpha=8.0, adapter_reduction_dim=8,
             side_reduction_factor=4, non_linearity="gelu", batch_size=4)
METHODS = {
    "full": {},
    "lora": {"use_lora": True, "lora_targets": ["query", "key", "value", "dense", "intermediate", "output"]},
    "adapter": {"use_adapter": True},
    "side": {"use_side": True},
    "side_only": {"use_side_only": True},
}
LAYOUTS = {
    2: {
        "tp": {"parallel": "tp", "tp_num_attention_heads_list": [3, 1], "tp_intermediate_size_list": [30, 18]},
        "sp": {"parallel": "sp", "seq_scatter_list": [7, 3]},
        "galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [3, 1],
                   "tp_intermediate_size_list": [30, 18], "seq_scatter_list": [7, 3]},
        "galaxy2": {"parallel": "galaxy2", "tp_num_attention_heads_list": [1, 3], "seq_scatter_list": [3, 7]},
        "dp": {"parallel": "dp"},
    },
    3: {
        "tp": {"parallel": "tp", "tp_num_attention_heads_list": [2, 1, 1], "tp_intermediate_size_list": [20, 20, 8]},
        "galaxy": {"parallel": "galaxy", "tp_num_attention_heads_list": [1, 2, 1],
                   "tp_intermediate_size_list": [8, 30, 10], "seq_scatter_list": [5, 3, 2]},
        "galaxy2": {"parallel": "galaxy2", "tp_num_attention_heads_list": [2, 1, 1], "seq_scatter_list": [2, 3, 5]},
    },
}
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, lora_dropout=0.1)
SAVE_CASE = ("lora", "galaxy")  # also saved with save_trainable_only and compared with serial


def make_batch():
    g = torch.Generator().manual_seed(7)
    B, T = MODEL["batch_size"], MODEL["seq_length"]
    ids = torch.randint(1, MODEL["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0  # padding, so the attention bias is exercised
    labels = torch.where(torch.rand(B, T, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    types = torch.randint(0, 2, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def local(full, p):
    """This rank's slice of the full tensor `full`, as parameter p holds it."""
    return own_slice(full, p)


def offset(name, p):
    return local(seeded(*full_shape(p), seed=zlib.crc32(name.encode())) * 0.1, p)


def build(cfg, ctx, rows=None):
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    apply_tuning(model, cfg, model.ctx)
    with torch.no_grad():  # the same nonzero offsets in every layout, so zero-initialised factors matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(offset(name, p))
    set_dropout_seed(model, 1234, step=0, rows=rows, samples=MODEL["batch_size"])
    return model


def serial_grads(cfg):
    model = build(cfg, None)
    batch = make_batch()
    n_tokens = (batch["labels"] != -100).sum()
    loss_sum, _ = model(**batch)
    (loss_sum / n_tokens).backward()
    return (loss_sum / n_tokens).item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def parallel_case(rank, world, cfg, save_dir):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    rows = replica_rows(MODEL["batch_size"], ctx)  # this replica's samples of the batch
    model = build(cfg, ctx, rows)
    sync = GradSync(model, ctx)
    batch = make_batch()
    n_tokens = (batch["labels"] != -100).sum()
    sync.arm()
    loss_sum, _ = model(**{k: v[rows.start:rows.stop] for k, v in batch.items()})
    (loss_sum / n_tokens).backward()
    sync.finish()
    loss_sum = loss_sum.detach().clone()
    if ctx.dp_group is not None:
        torch.distributed.all_reduce(loss_sum, group=ctx.dp_group)
    if save_dir:
        model.save_hf(save_dir, trainable_only=True)
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    return (loss_sum / n_tokens).item(), model, frozen_grads


def _run_cases(rank, world, save_dir):
    out = {}
    for method, tuning in METHODS.items():
        for layout, keys in LAYOUTS[world].items():
            serial_loss, grads = serial_grads(load_config(None, {**MODEL, **tuning, **DROPOUT}))
            cfg = load_config(None, {**MODEL, **tuning, **DROPOUT, **keys})
            save = save_dir if (method, layout) == SAVE_CASE else None
            loss, model, frozen_grads = parallel_case(rank, world, cfg, save)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            errs = {n: grad_err(p.grad, local(grads[n], p), grads) for n, p in trainable.items()}
            out[(method, layout)] = {"loss": (loss, serial_loss), "grad_errs": errs,
                                     "missing": sorted(set(grads) - set(trainable)), "frozen_grads": frozen_grads}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_in_every_layout_matches_serial(world, tmp_path):
    results = run_ranks(_run_cases, world, str(tmp_path / "lora"), timeout_s=300.0)
    for rank, cases in enumerate(results):
        assert set(cases) == {(m, lay) for m in METHODS for lay in LAYOUTS[world]}
        for (method, layout), r in cases.items():
            where = f"{method} on {layout}, rank {rank}"
            loss, serial = r["loss"]
            assert abs(loss - serial) <= 1e-5 * abs(serial), f"{where}: loss {loss} vs serial {serial}"
            assert r["grad_errs"], f"{where}: nothing trains"
            bad = {n: e for n, e in r["grad_errs"].items() if not e < 1e-5}
            assert not bad, f"{where}: gradients differ from serial: {bad}"
            assert not r["frozen_grads"], f"{where}: frozen parameters got gradients {r['frozen_grads']}"
            assert not r["missing"], f"{where}: trainable in serial but not on this rank: {r['missing']}"
    if world == 2:
        check_saved_lora(tmp_path / "lora")


def check_saved_lora(path):
    """save_trainable_only under Galaxy writes exactly serial's LoRA tensors, gathered, HF-named."""
    method, _ = SAVE_CASE
    cfg = load_config(None, {**MODEL, **METHODS[method], **DROPOUT})
    serial = build(cfg, None)
    expected = {mlm_to_hf(n): p.detach() for n, p in serial.named_parameters() if p.requires_grad}
    saved = {}
    for f in sorted(path.glob("*.safetensors")):
        saved.update(load_file(str(f)))
    assert set(saved) == set(expected)
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in saved
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
