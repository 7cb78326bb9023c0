"""LLaMA checkpoints written by the installed transformers, checked against transformers itself:
in both config formats (transformers 5's rope_parameters; before it, top-level rope_theta and
rope_scaling), with every supported RoPE type and with an explicit head_dim, they give its logits
and its greedy tokens, serial, tensor-parallel and sequence-parallel at world 2 and 3 (uneven);
save_hf writes what it reads back; generate.py runs on such a directory. transformers is a
test-only dependency: without it these tests are skipped."""
import functools
import json
import shutil

import pytest
import torch

import generate
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.inference.generate import greedy_generate
from galaxy.models.llama import LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import rel_err, run_ranks, tiny_llama_tokenizer

transformers = pytest.importorskip("transformers")

# 8 query heads in 4 KV groups of 2, so heads split unevenly: [6, 2] and [4, 2, 2]. initializer_range
# 0.2 rather than 0.02 keeps a tiny random model's greedy choices clear of near-ties.
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=32, initializer_range=0.2)
THETA = 500000.0  # LLaMA 3's; read as 10000 it changes the logits
# name: (rope_parameters, config changes). The inputs run past position 32, where dynamic starts
# scaling; llama3's 4 frequencies (head_dim 8) fall in all 3 of its bands: kept, blended, divided.
CASES = {
    "default": ({"rope_type": "default"}, {}),
    "linear": ({"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, {}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}, {"max_position_embeddings": 1024}),
    "head_dim 16": ({"rope_type": "default"}, {"head_dim": 16}),  # not hidden / heads = 8
}
IDS = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
PROMPT, NEW_TOKENS = IDS[:1, :20], 24  # generation too runs past position 32
SPLITS = {2: dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[64, 32], seq_scatter_list=[24, 16]),
          3: dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[48, 24, 24],
                  seq_scatter_list=[16, 14, 10])}


def write_old_format(src, dst):
    """src's checkpoint with the config.json of transformers < 5: top-level rope_theta, and for scaled
    RoPE a rope_scaling with the type under "type" (LLaMA 2 era) or "rope_type" (LLaMA 3.1)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], kind = rope.pop("rope_theta"), rope.pop("rope_type")
    if kind != "default":
        cfg["rope_scaling"] = {"rope_type" if kind == "llama3" else "type": kind, **rope}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(case, format) -> a directory written by transformers' save_pretrained (random weights)."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for i, (case, (rope, changes)) in enumerate(CASES.items()):
        cfg = transformers.LlamaConfig(**{**SHAPE, **changes}, rope_parameters={**rope, "rope_theta": THETA})
        torch.manual_seed(i)
        new = root / f"{i}-transformers5"
        transformers.LlamaForCausalLM(cfg).save_pretrained(new)
        out[case, "transformers5"], out[case, "old"] = new, write_old_format(new, root / f"{i}-old")
    return out


def hf_model(path):
    """A freshly loaded model per use: transformers' dynamic RoPE keeps state between calls."""
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens, like greedy_generate without eos_id
    return model


@functools.cache
def hf_logits(path):
    with torch.no_grad():
        return hf_model(path)(IDS).logits


@functools.cache
def hf_tokens(path, prompt=PROMPT, new_tokens=NEW_TOKENS):
    # an explicit mask: without one, transformers masks out every prompt token equal to pad_token_id
    return hf_model(path).generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=new_tokens, pad_token_id=0)


@pytest.mark.parametrize("fmt", ["transformers5", "old"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(checkpoints, case, fmt):
    path = checkpoints[case, fmt]
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(path)(IDS)
    assert rel_err(got, hf_logits(path)) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_match_transformers(checkpoints, case):
    path = checkpoints[case, "transformers5"]
    assert torch.equal(greedy_generate(LlamaForCausalLM.from_pretrained(path), PROMPT, NEW_TOKENS), hf_tokens(path))


@pytest.mark.parametrize("case", CASES)
def test_save_hf_is_read_back_by_transformers(checkpoints, case, tmp_path):
    LlamaForCausalLM.from_pretrained(checkpoints[case, "old"]).save_hf(tmp_path / "saved")
    assert rel_err(hf_logits(tmp_path / "saved"), hf_logits(checkpoints[case, "transformers5"])) < 1e-5


def _parallel_runs(rank, world, paths):
    """Per case: TP greedy tokens and SP logits on this rank."""
    tokens, logits = {}, {}
    for layout in ("tp", "sp"):  # the plan needs only the shape every case shares (the inputs run past 32)
        cfg = load_config(None, {**SHAPE, **SPLITS[world], "model": "llama", "seq_length": IDS.shape[1],
                                 "max_position_embeddings": IDS.shape[1], "parallel": layout})
        ctx = ParallelContext.create(build_plan(cfg, world), rank)
        for case, path in paths.items():
            model = LlamaForCausalLM.from_pretrained(path, ctx)
            if layout == "tp":
                tokens[case] = greedy_generate(model, PROMPT, NEW_TOKENS)
            else:
                with torch.no_grad():
                    logits[case] = model(IDS)
    return tokens, logits


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_and_sequence_parallel_match_transformers(checkpoints, world):
    paths = {case: checkpoints[case, "transformers5"] for case in CASES}
    results = run_ranks(_parallel_runs, world, paths, timeout_s=300)
    for case, path in paths.items():
        for rank, (tokens, logits) in enumerate(results):
            assert torch.equal(tokens[case], hf_tokens(path)), (case, rank)
            assert rel_err(logits[case], hf_logits(path)) < 1e-5, (case, rank)


def test_generate_script_runs_on_a_transformers_checkpoint(checkpoints, tmp_path, capsys):
    """transformers' config.json says "dtype": "float32"; that once reached the engine's own dtype
    key and generate.py exited 2."""
    path, tokenizer = checkpoints["llama3", "transformers5"], str(tiny_llama_tokenizer(tmp_path))
    args, cfg, plan, _, _ = generate.parse(["--checkpoint", str(path), "--prompt", "Question: What is a list?",
                                            "--max_new_tokens", "6", "--tokenizer_file", tokenizer, "--ignore_eos"])
    capsys.readouterr()
    generate.main(0, 1, args, cfg, plan)
    prompt = torch.tensor([args.prompt_ids])  # [bos] + the prompt's tokens
    want = hf_tokens(path, prompt, 6)[0, prompt.shape[1]:].tolist()
    assert f"new tokens: {want}]" in capsys.readouterr().out
