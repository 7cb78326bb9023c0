"""apply_tuning on the serial model: what trains, how many parameters, what the optimizer holds,
how a fresh method starts, and which configs are refused."""
from pathlib import Path

import pytest
import torch

from galaxy.config.load import load_config, read_config
from galaxy.errors import ConfigError
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.plan import build_plan
from galaxy.train.optim import build_optimizer
from galaxy.tuning.apply import apply_tuning

H, I, L, R = 32, 48, 2, 4
MODEL = dict(hidden_size=H, intermediate_size=I, num_attention_heads=4, num_hidden_layers=L, vocab_size=64,
             seq_length=8, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             lora_dim=R, adapter_reduction_dim=8, side_reduction_factor=4)
# (in, out) of each LoRA target in a BERT layer
SHAPES = {"query": (H, H), "key": (H, H), "value": (H, H), "dense": (H, H), "intermediate": (H, I), "output": (I, H)}


def tuned(**keys):
    cfg = load_config(None, {**MODEL, **keys})
    model = BertForMaskedLM(BertConfig.from_dict(cfg))
    apply_tuning(model, cfg, model.ctx)
    return model, cfg


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids}


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", [["query", "value"], list(SHAPES)])
def test_lora_trainable_count_is_r_times_in_plus_out_per_target(targets):
    model, _ = tuned(use_lora=True, lora_targets=targets)
    expected = L * sum(R * (SHAPES[t][0] + SHAPES[t][1]) for t in targets)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all("lora_" in n for n in trainable_names(model))


@pytest.mark.parametrize("method, marker", [("use_lora", "lora_"), ("use_adapter", "adapter"),
                                            ("use_side", "side"), ("use_side_only", "side")])
def test_frozen_parameters_get_no_gradient_and_stay_out_of_the_optimizer(method, marker):
    model, cfg = tuned(**{method: True})
    trainable = trainable_names(model)
    assert trainable and all(marker in n for n in trainable)
    loss, n = model(**batch())
    (loss / n).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    opt, _ = build_optimizer(model, cfg, total_steps=10)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["use_lora", "use_adapter", "use_side"])
def test_a_fresh_method_computes_what_the_frozen_model_did(method):
    """lora_B, adapter_up and (use_side) side_upsample start at zero."""
    reference, _ = tuned()
    model, _ = tuned(**{method: True})
    assert torch.equal(model(**batch())[0], reference(**batch())[0])


def test_lora_dropout_acts_on_the_lora_path_only_in_training():
    model, _ = tuned(use_lora=True, lora_dropout=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.train()
    train_loss = model(**batch())[0]
    model.eval()
    eval_loss = model(**batch())[0]
    assert not torch.equal(train_loss, eval_loss)


def test_merge_weights_on_eval_keeps_the_output():
    model, _ = tuned(use_lora=True, lora_targets=list(SHAPES), merge_weights=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.train()
    unmerged = model(**batch())[0]
    model.eval()
    torch.testing.assert_close(model(**batch())[0], unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys, message", [
    ({"use_lora": True, "lora_targets": ["query", "attention"]}, "lora_targets"),
    ({"use_lora": True, "lora_dim": 0}, "lora_dim"),
    ({"use_lora": True, "fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"use_adapter": True, "adapter_reduction_dim": 0}, "adapter_reduction_dim"),
    ({"use_adapter": True, "non_linearity": "swish"}, "non_linearity"),
    ({"use_side": True, "side_reduction_factor": 5}, "side_reduction_factor"),
    ({"use_lora": True, "use_adapter": True}, "tuning methods"),
])
def test_bad_tuning_configs_fail_at_load_naming_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**MODEL, **keys})


CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("train_config/bert/**/*.json"))
METHOD_OF = {"lora": "use_lora", "adapter": "use_adapter", "side": "use_side"}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in METHOD_OF], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_tuning_configs_load_plan_and_keep_the_folders_layout(path):
    cfg = load_config(path)
    assert cfg[METHOD_OF[path.stem]] and not cfg["full_model"]
    build_plan(cfg, 1 if path.parent.name == "bert" else 2)
    raw, full = read_config(path), read_config(path.parent / "full.json")
    assert {k: v for k, v in raw.items() if k in full and k != "full_model"} == \
        {k: v for k, v in full.items() if k != "full_model"}, "keys shared with full.json must match it"
