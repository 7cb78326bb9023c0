"""Serial BERT basics and config validation (no processes)."""
import pytest
import torch

from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.errors import ConfigError
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.plan import build_plan

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=50,
            seq_length=16, batch_size=4)


def test_forward_is_deterministic_and_a_step_lowers_the_loss():
    cfg = load_config(None, TINY)
    batch = SyntheticMLM(50, 16, seed=0).get_batch([0, 1, 2, 3])
    a, b = BertForMaskedLM(BertConfig.from_dict(cfg)), BertForMaskedLM(BertConfig.from_dict(cfg))
    a.eval(), b.eval()
    assert torch.equal(a(**batch)[0], b(**batch)[0])  # same seed-by-name init, same numbers
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    loss_sum, n = a(**batch)
    (loss_sum / n).backward()
    opt.step()
    assert a(**batch)[0] < loss_sum


@pytest.mark.parametrize("overrides, world, message", [
    ({"parallel": "tp", "tp_num_attention_heads_list": [3, 2]}, 2, "tp_num_attention_heads_list \\[3, 2\\] sums to 5, model has 4"),
    ({"parallel": "tp", "tp_num_attention_heads_list": [2, 1, 1]}, 2, "has 3 entries"),
    ({"parallel": "sp", "seq_scatter_list": [10, 5]}, 2, "seq_scatter_list \\[10, 5\\] sums to 15"),
    ({"parallel": "galaxy", "tp_intermediate_size_list": [64, 0]}, 2, "at least one"),
    ({"parallel": "warp"}, 2, "parallel 'warp'"),
    ({"att_parallel_method": "XP"}, 2, "att_parallel_method 'XP'"),
])
def test_bad_layouts_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(load_config(None, {**TINY, **overrides}), world)


@pytest.mark.parametrize("overrides, message", [
    ({"hidden_sise": 32}, "unknown config key 'hidden_sise'"),
    ({"hidden_size": "32"}, "'hidden_size' must be int"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads"),
    ({"use_lora": True, "use_adapter": True}, "set exactly one"),
    ({"seq_scatter_list": [1, "2"]}, "list of integers"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**TINY, **overrides})


def test_prototype_aliases_are_accepted():
    cfg = load_config(None, {"pad_size": 64, "lr": 0.1, "lora_att_dim": 4, "con_parallel_method": "None"})
    assert (cfg["seq_length"], cfg["learning_rate"], cfg["lora_dim"]) == (64, 0.1, 4)
