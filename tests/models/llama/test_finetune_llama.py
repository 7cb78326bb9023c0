"""finetune_llama.py end to end (serial, in-process) on the shipped instructions with a tiny
tokenizer trained here, and the shipped LLaMA configs."""
import json

import pytest

import finetune_llama
from galaxy.models.llama import LlamaConfig
from galaxy.plan import build_plan
from galaxy.train import entry
from galaxy.train.config import load_config
from tests.helpers import ROOT, SHIPPED, tiny_llama_tokenizer

TINY = ["--hidden_size", "64", "--intermediate_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--num_hidden_layers", "2", "--seq_length", "64", "--batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "2", "--lr_scheduler", "constant"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(tiny_llama_tokenizer(tmp_path_factory.mktemp("spm")))


def finetune(tmp_path, tokenizer, *extra):
    metrics = tmp_path / "metrics.jsonl"
    entry.main(finetune_llama.__doc__, "llama", str(ROOT / "train_config/llama/full.json"), finetune_llama.build_model,
               finetune_llama.build_data, ["--data_file", str(SHIPPED / "instructions.jsonl"), "--tokenizer_file", tokenizer,
                                           "--vocab_size", "300", "--metrics_file", str(metrics), *TINY, *extra])
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def test_full_finetune_lowers_the_loss(tmp_path, tokenizer):
    losses = finetune(tmp_path, tokenizer, "--max_steps", "10")
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_bf16_with_activation_checkpointing_trains(tmp_path, tokenizer):
    losses = finetune(tmp_path, tokenizer, "--max_steps", "6", "--dtype", "bf16", "--activation_checkpointing", "true")
    assert losses[-1] < losses[0], losses


def test_configs_validate():
    for name, world in [("tiny", 1), ("full", 1), ("7b", 1), ("tp/full", 2), ("sp/full", 2), ("galaxy/full", 2)]:
        cfg = load_config(ROOT / f"train_config/llama/{name}.json")
        assert cfg["model"] == "llama" and build_plan(cfg, world).world == world
    lora = load_config(ROOT / "train_config/llama/lora.json")
    assert lora["use_lora"] and not lora["full_model"]
    b7 = LlamaConfig.from_dict(load_config(ROOT / "train_config/llama/7b.json"))
    assert (b7.hidden_size, b7.intermediate_size, b7.num_attention_heads, b7.num_hidden_layers, b7.vocab_size) == \
        (4096, 11008, 32, 32, 32000)
