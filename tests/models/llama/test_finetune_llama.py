"""finetune_llama.py end to end (serial, in-process) on the shipped instructions with a tiny
tokenizer trained here, and the shipped LLaMA configs; a LoRA fine-tune saved trainable-only,
loaded back by the entry and by generate.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

import finetune_llama
import generate
from galaxy.app import train
from galaxy.config.load import load_config
from galaxy.inference.generate import greedy_generate
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import ROOT, SHIPPED, tiny_llama_tokenizer

TINY = ["--hidden_size", "64", "--intermediate_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--num_hidden_layers", "2", "--seq_length", "64", "--batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "2", "--lr_scheduler", "constant"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(tiny_llama_tokenizer(tmp_path_factory.mktemp("spm")))


def finetune(tmp_path, tokenizer, *extra):
    metrics = tmp_path / "metrics.jsonl"
    train.main(finetune_llama.__doc__, "llama", str(ROOT / "train_config/llama/full.json"),
               ["--data_file", str(SHIPPED / "instructions.jsonl"), "--tokenizer_file", tokenizer,
                "--vocab_size", "300", "--metrics_file", str(metrics), *TINY, *extra])
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def test_full_finetune_lowers_the_loss(tmp_path, tokenizer):
    losses = finetune(tmp_path, tokenizer, "--max_steps", "10")
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


def test_bf16_with_activation_checkpointing_trains(tmp_path, tokenizer):
    losses = finetune(tmp_path, tokenizer, "--max_steps", "6", "--dtype", "bf16", "--activation_checkpointing", "true")
    assert losses[-1] < losses[0], losses


def test_truncation_is_reported_once_at_start_up(tmp_path, tokenizer, capsys):
    finetune(tmp_path, tokenizer, "--max_steps", "1")
    assert capsys.readouterr().out.count("samples are longer than seq_length 64 and were cut") == 1


def test_a_step_without_label_tokens_stops(tmp_path, tokenizer):
    """Every prompt longer than seq_length: no token carries loss, which trained on at loss 0.0000."""
    rows = [{"input": f"question {i}: " + "what does this module define? " * 20, "target": "a class"} for i in range(8)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"step 1: samples \[0, 1, 2, 3, 4, 5, 6, 7\] carry no label token"):
        finetune(tmp_path, tokenizer, "--max_steps", "2", "--data_file", str(tmp_path / "long.jsonl"))


def test_configs_validate():
    for name, world in [("tiny", 1), ("full", 1), ("7b", 1), ("tp/full", 2), ("sp/full", 2), ("galaxy/full", 2)]:
        cfg = load_config(ROOT / f"train_config/llama/{name}.json")
        assert cfg["model"] == "llama" and build_plan(cfg, world).world == world
    lora = load_config(ROOT / "train_config/llama/lora.json")
    assert lora["use_lora"] and not lora["full_model"]
    b7 = LlamaConfig.from_dict(load_config(ROOT / "train_config/llama/7b.json"))
    assert (b7.hidden_size, b7.intermediate_size, b7.num_attention_heads, b7.num_hidden_layers, b7.vocab_size) == \
        (4096, 11008, 32, 32, 32000)


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_lora_saved_trainable_only_loads_in_the_entry_and_in_generate(tmp_path, tokenizer, capsys):
    base, lora, again = tmp_path / "base", tmp_path / "lora", tmp_path / "again"
    for run in "btl":  # each run's metrics file
        (tmp_path / run).mkdir()
    finetune(tmp_path / "b", tokenizer, "--max_steps", "1", "--save_dir", str(base))
    lora_args = ["--load_checkpoint", str(base), "--use_lora", "true", "--lora_dim", "4", "--save_trainable_only", "true"]
    trained = finetune(tmp_path / "t", tokenizer, *lora_args, "--max_steps", "3", "--save_dir", str(lora))
    # learning_rate 0: the loaded LoRA is saved again unchanged, and its first loss is the trained model's
    loaded = finetune(tmp_path / "l", tokenizer, *lora_args, "--max_steps", "1", "--learning_rate", "0",
                      "--load_trainable", str(lora), "--save_dir", str(again))
    assert loaded[0] < trained[0], (loaded, trained)  # trained[0]: LoRA B = 0, the base model alone
    first, second = _tensors(lora), _tensors(again)
    assert set(first) == set(second) and len(first) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((lora / "tuning.json").read_text())["lora_dim"] == 4

    capsys.readouterr()
    args, cfg, plan, _, _ = generate.parse(["--checkpoint", str(base), "--load_trainable", str(lora),
                                          "--prompt", "Question: What is a list?", "--max_new_tokens", "6",
                                          "--tokenizer_file", tokenizer, "--ignore_eos"])
    generate.main(0, 1, args, cfg, plan)
    printed = capsys.readouterr().out
    merged = merged_generation(base, first, cfg, args.prompt, tokenizer)
    assert f"new tokens: {merged}]" in printed, printed
    assert merged != merged_generation(base, {}, cfg, args.prompt, tokenizer)  # the LoRA changes the answer


def merged_generation(base, lora, cfg, prompt, tokenizer):
    """The same greedy tokens from the base model with W + B A * alpha / r merged in by hand."""
    model = LlamaForCausalLM.from_pretrained(base)
    weights = {model.to_hf(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for name in [k for k in lora if k.endswith(".lora_A")]:
            stem = name[:-len(".lora_A")]
            weights[stem + ".weight"] += lora[stem + ".lora_B"] @ lora[name] * (cfg["lora_alpha"] / cfg["lora_dim"])
    tok = generate.Tokenizer(tokenizer)
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    return greedy_generate(model, ids, 6)[0, ids.shape[1]:].tolist()
