"""Grouped-query and position rules hold in every layout, and stop the command line (exit 2,
naming the key) before any process group exists; the model config refuses the same values."""
import pytest

from galaxy.app import cli
from galaxy.models.llama import LlamaConfig

LAYOUTS = [["--world", "1"], ["--world", "2", "--parallel", "sp"], ["--world", "2", "--parallel", "galaxy2"],
           ["--world", "2", "--parallel", "tp"], ["--world", "2", "--stage_num_hidden_layers_list", "[1,1]"]]


def exit_message(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        cli.parse("test", "train_config/llama/full.json", ["--num_hidden_layers", "2", *argv])
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda a: " ".join(a))
@pytest.mark.parametrize("kv", ["0", "3", "-1"])
def test_kv_heads_that_do_not_group_the_heads_are_refused(capsys, layout, kv):
    err = exit_message(capsys, *layout, "--num_key_value_heads", kv)
    assert f"config key 'num_key_value_heads' is {kv}; it must be >= 1 and divide num_attention_heads 8" in err


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda a: " ".join(a))
def test_llama_sequence_longer_than_its_positions_is_refused(capsys, layout):
    err = exit_message(capsys, *layout, "--seq_length", "256", "--max_position_embeddings", "128")
    assert "seq_length 256 exceeds max_position_embeddings 128" in err


@pytest.mark.parametrize("kv", [0, 3])
def test_model_config_refuses_them_too(kv):  # a Hugging Face config.json reaches the model without the CLI
    with pytest.raises(ValueError, match=f"'num_key_value_heads' is {kv}"):
        LlamaConfig.from_dict({"num_attention_heads": 8, "hidden_size": 64, "num_key_value_heads": kv})
