"""Each architecture owns its defaults: a config that leaves a model key out gets the model
config class's value (galaxy/models/*/), not another architecture's."""
import pytest

from galaxy.config.load import load_config
from galaxy.models.bart import BartConfig
from galaxy.models.llama import LlamaConfig
from galaxy.models.registry import build_model

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
         "vocab_size": 100, "seq_length": 16}


def test_bart_without_eps_or_attention_dropout_gets_barts_own():
    cfg = load_config(None, {"model": "bart", **SMALL})
    assert cfg["layer_norm_eps"] == BartConfig.layer_norm_eps == 1e-5
    assert cfg["attention_probs_dropout_prob"] == BartConfig.attention_probs_dropout_prob == 0.0
    model = build_model(cfg)
    assert model.model.encoder.layernorm_embedding.eps == 1e-5


@pytest.mark.parametrize("model, key, value", [("bert", "layer_norm_eps", 1e-12), ("bert", "vocab_size", 30522),
                                               ("llama", "rms_norm_eps", LlamaConfig.rms_norm_eps),
                                               ("llama", "max_position_embeddings", LlamaConfig.max_position_embeddings)])
def test_left_out_keys_take_the_architectures_default(model, key, value):
    assert load_config(None, {"model": model})[key] == value


def test_given_keys_win_over_the_architecture():
    assert load_config(None, {"model": "bart", "layer_norm_eps": 1e-6})["layer_norm_eps"] == 1e-6
