"""generate.py refuses, before any process starts (exit 2, naming the flag), a negative
--max_new_tokens and a prompt that with its new tokens runs past max_position_embeddings."""
import pytest

import generate
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import Method
from tests.helpers import ROOT, SHIPPED


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=32)).save_hf(path)
    return path


def refused(capsys, checkpoint, *args):
    with pytest.raises(SystemExit) as stop:
        generate.parse(["--checkpoint", str(checkpoint), "--tokenizer_file", str(SHIPPED / "spm_llama.model"), *args])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_negative_max_new_tokens(capsys, checkpoint):
    assert "--max_new_tokens must be >= 1, got -5" in refused(capsys, checkpoint, "--prompt", "Hi", "--max_new_tokens", "-5")


def test_prompt_and_new_tokens_past_the_positions(capsys, checkpoint):
    err = refused(capsys, checkpoint, "--prompt", "What is a list? " * 10, "--max_new_tokens", "4")
    assert "--max_new_tokens 4 exceeds the checkpoint's max_position_embeddings 32" in err and "--prompt (" in err
    err = refused(capsys, checkpoint, "--prompt", "Hi", "--max_new_tokens", "40")
    assert "--max_new_tokens 40 exceeds the checkpoint's max_position_embeddings 32" in err


def test_a_prompt_that_fits_is_accepted(checkpoint):
    args = generate.parse(["--checkpoint", str(checkpoint), "--tokenizer_file", str(SHIPPED / "spm_llama.model"),
                           "--prompt", "Hi", "--max_new_tokens", "8"])[0]
    assert len(args.prompt_ids) + 8 <= 32


def test_training_flags_are_refused(capsys, checkpoint):
    assert "--explain records training steps; generate.py has none" in refused(capsys, checkpoint, "--prompt", "Hi",
                                                                                "--max_new_tokens", "4", "--explain")


def test_a_directory_without_config_json(capsys, tmp_path):
    err = refused(capsys, tmp_path, "--prompt", "Hi")
    assert f"{tmp_path / 'config.json'} not found (--checkpoint must be a Hugging Face LLaMA directory)" in err


def test_the_layout_comes_from_the_config_and_its_splits_are_checked(capsys, checkpoint):
    galaxy = ["--prompt", "Hi", "--max_new_tokens", "4", "--config_file", str(ROOT / "train_config/llama/galaxy/full.json"),
              "--world", "3"]
    err = refused(capsys, checkpoint, *galaxy, "--tp_num_attention_heads_list", "[2,1,2]")
    assert "tp_num_attention_heads_list [2, 1, 2] sums to 5, model has 4 attention heads" in err
    plan = generate.parse(["--checkpoint", str(checkpoint), "--tokenizer_file", str(SHIPPED / "spm_llama.model"),
                           *galaxy, "--tp_num_attention_heads_list", "[2,1,1]", "--tp_intermediate_size_list",
                           "[16,16,16]"])[2]
    assert (plan.att, plan.con, plan.heads, plan.positions) == (Method.TP, Method.SP, (2, 1, 1), (1, 1, 1))  # even shares
