"""The typed config: frozen sections owned by the modules that use them, read as a mapping of
keys, changed only by replacing a section; loading imports no model code."""
import dataclasses
import subprocess
import sys

import pytest

from galaxy.config.load import SECTIONS, Config, describe_keys, load_config
from galaxy.errors import ConfigError
from galaxy.models.bert import BertConfig
from galaxy.models.llama import LlamaConfig
from tests.helpers import ROOT

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 100, "seq_length": 16}


def test_loading_a_config_imports_no_model_code():
    """The registry names each architecture's classes; only the config classes (light) are read."""
    models = ["galaxy.models.bert.model", "galaxy.models.llama.model", "galaxy.models.bart.model",
              "galaxy.models.common", "galaxy.layers.attention"]
    code = ("import sys; from galaxy.config.load import load_config; load_config('train_config/bert/full.json'); "
            f"print([m for m in {models} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_every_key_has_a_one_line_description():
    docs = describe_keys()
    assert len(docs) > 80
    assert not [k for k, doc in docs.items() if not doc.strip() or "\n" in doc]


def test_sections_are_typed_frozen_and_read_as_one_mapping():
    cfg = load_config(None, {**TINY, "lr": 0.1, "pad_size": 16, "use_lora": True})
    assert isinstance(cfg.model, BertConfig) and cfg.optim.learning_rate == cfg["learning_rate"] == 0.1
    assert cfg.data.seq_length == 16 and "pad_size" not in cfg  # aliases are translated once, at load
    assert cfg.tuning.full_model is False and cfg["full_model"] is False
    with pytest.raises(TypeError):
        cfg["learning_rate"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0
    assert load_config(None, dict(cfg)) == cfg  # every key, round trip
    assert {f.name for s in SECTIONS.values() for f in dataclasses.fields(s)} < set(cfg)


def test_a_changed_config_is_a_new_section_checked_again():
    cfg = load_config(None, TINY)
    moved = cfg.with_layout(parallel="galaxy", tp_num_attention_heads_list=[1, 1])
    assert isinstance(moved, Config) and moved["tp_num_attention_heads_list"] == [1, 1]
    assert cfg["tp_num_attention_heads_list"] is None  # the old one is untouched
    with pytest.raises(ConfigError, match="virtual_stages 2 needs pipeline_schedule"):
        cfg.with_layout(virtual_stages=2)
    reseeded = cfg.replace(loop=dataclasses.replace(cfg.loop, seed=7, activation_checkpointing=True))
    assert (reseeded.model.seed, reseeded.model.activation_checkpointing) == (7, True)  # the model's copies follow


def test_the_model_section_is_the_architectures_own_class():
    cfg = load_config(None, {"model": "llama", **TINY, "num_key_value_heads": 1})
    assert isinstance(cfg.model, LlamaConfig) and cfg.model.num_key_value_heads == 1
    assert "type_vocab_size" not in cfg and "rms_norm_eps" in cfg  # BERT's keys are not LLaMA's


def test_a_key_of_another_architecture_is_checked_then_ignored():
    cfg = load_config(None, {**TINY, "num_key_value_heads": 1, "rope_theta": 500000.0})
    assert "num_key_value_heads" not in cfg and cfg.get("rope_theta") is None
    with pytest.raises(ConfigError, match="'num_key_value_heads' is 3; it must be >= 1 and divide"):
        load_config(None, {**TINY, "num_key_value_heads": 3})
