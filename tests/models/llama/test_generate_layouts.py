"""Greedy generation with a KV cache in every layout, against transformers and the serial model.

A tiny GQA LLaMA written by transformers' save_pretrained is loaded into TP, Galaxy, Galaxy2, SP and
pipeline layouts (interleaved stages too) at world 2 and 3 with uneven splits. Every rank's tokens
equal transformers' generate(do_sample=False); each step's logits equal the serial model's (and the
serial model's equal transformers'); with the cache they equal recomputing the whole sequence every
step. One prompt is shorter than world 3, so a sequence-parallel rank starts with no positions.
generate.py takes the layout from its config and the command line."""
import functools

import pytest
import torch

import generate
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.inference.generate import GrowingSequence, SequenceSplit, greedy_generate, greedy_steps, kv_caches
from galaxy.models.llama import LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import ROOT, rel_err, run_ranks, tiny_llama_tokenizer

transformers = pytest.importorskip("transformers")

# 8 query heads in 4 KV groups of 2; initializer_range 0.2 keeps a tiny random model's greedy
# choices clear of near-ties
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.2)
_ids = torch.randint(0, SHAPE["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(0))
PROMPTS = [_ids[:2], _ids[2:, :2]]  # a batch of two rows; one row of two tokens
NEW_TOKENS = 8
SPLITS = {2: dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[64, 32], seq_scatter_list=[3, 2],
                  seq_length=5),
          3: dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[48, 24, 24],
                  seq_scatter_list=[3, 2, 1], seq_length=6)}
STAGES = {2: [1, 3], 3: [2, 1, 1]}  # stage_num_hidden_layers_list
LAYOUTS = {"tp": {"parallel": "tp"}, "galaxy": {"parallel": "galaxy"}, "galaxy2": {"parallel": "galaxy2"},
           "sp": {"parallel": "sp"}, "pp": {"parallel": "pp"}}  # pp: + STAGES
INTERLEAVED = {"pp interleaved": {"parallel": "pp", "stage_num_hidden_layers_list": [1, 1, 1, 1], "virtual_stages": 2,
                                  "num_microbatches": 2, "batch_size": 2,
                                  "pipeline_schedule": "interleaved-1f1b"}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(path)
    return path


@functools.cache
def hf_generate(path, index):
    """transformers' greedy tokens (the new ones) and the logits of each step."""
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    prompt = PROMPTS[index]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                         eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, prompt.shape[1]:], out.logits


def steps(model, prompt, use_cache=True):
    """(new tokens [B, NEW_TOKENS], each step's logits or None off the last pipeline stage)."""
    tokens, logits = zip(*greedy_steps(model, prompt, NEW_TOKENS, use_cache), strict=True)
    return torch.cat(tokens, 1), logits


@torch.no_grad()
def in_pieces(model, ids, cut):
    """The logits of ids run whole, and run as ids[:, :cut] then the rest with the cache: several new
    tokens in one cached step, split over a sequence-parallel group's ranks."""
    model.eval()
    whole = GrowingSequence(model)(ids)
    with kv_caches(model):
        run = GrowingSequence(model)
        pieces = [run(ids[:, :cut]), run(ids[:, cut:])]
    return whole, pieces


def _in_layouts(rank, world, path, layouts):
    """Per layout: per prompt, steps with the cache and without it; a sequence whole and in pieces."""
    out = {}
    for name, keys in layouts.items():
        stages = {"stage_num_hidden_layers_list": STAGES[world]} if name == "pp" else {}
        cfg = load_config(None, {**SHAPE, **SPLITS[world], **stages, **keys, "model": "llama"})
        model = LlamaForCausalLM.from_pretrained(path, ParallelContext.create(build_plan(cfg, world), rank))
        out[name] = [(steps(model, p), steps(model, p, use_cache=False)) for p in PROMPTS], in_pieces(model, _ids, 4)
    return out


def assert_logits_match(got, want, what):
    assert len(got) == len(want) == NEW_TOKENS, what
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, w) < 1e-5, (what, step)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_serial_matches_transformers(checkpoint, index):
    model = LlamaForCausalLM.from_pretrained(checkpoint)
    want_tokens, want_logits = hf_generate(checkpoint, index)
    (tokens, logits), (recomputed, logits_recomputed) = steps(model, PROMPTS[index]), steps(model, PROMPTS[index], False)
    assert torch.equal(tokens, want_tokens) and torch.equal(recomputed, want_tokens)
    assert_logits_match(logits, want_logits, "serial, cached")
    assert_logits_match(logits_recomputed, logits, "serial, recomputed")
    assert torch.equal(greedy_generate(model, PROMPTS[index], NEW_TOKENS)[:, PROMPTS[index].shape[1]:], tokens)


@pytest.mark.parametrize("world", [2, 3])
def test_every_layout_generates_as_serial_and_transformers(checkpoint, world):
    layouts = {**LAYOUTS, **(INTERLEAVED if world == 2 else {})}
    serial = LlamaForCausalLM.from_pretrained(checkpoint)
    want_logits = [steps(serial, p)[1] for p in PROMPTS]
    results = run_ranks(_in_layouts, world, str(checkpoint), layouts, timeout_s=300)
    for name in layouts:
        holders = 0  # ranks that hold the logits: every rank, or a pipeline's last stage
        for rank, out in enumerate(results):
            generated, (whole, pieces) = out[name]
            if whole is not None:
                assert rel_err(torch.cat(pieces, 1), whole) < 1e-5, (name, rank, "in pieces")
            for index, ((tokens, logits), (recomputed, logits_recomputed)) in enumerate(generated):
                what = (name, rank, index)
                assert torch.equal(tokens, hf_generate(checkpoint, index)[0]), what
                assert torch.equal(recomputed, tokens), what
                if logits[0] is None:
                    assert all(x is None for x in logits + logits_recomputed), what
                    continue
                holders += 1
                assert_logits_match(logits, want_logits[index], what)
                assert_logits_match(logits_recomputed, logits, what + ("recomputed",))
        assert holders == len(PROMPTS) * (1 if name.startswith("pp") else world), name


def test_sequence_split_follows_the_shares():
    split = SequenceSplit((3, 2, 1))
    assert split.take(6) == [3, 2, 1]
    owners = [split.take(1).index(1) for _ in range(6)]  # one position at a time, as decoding places them
    assert owners == [0, 1, 0, 0, 1, 2] and split.held == [6, 4, 2]
    assert SequenceSplit((3, 2, 1)).take(2) == [1, 1, 0]  # a short prompt leaves the smallest share empty


def _generate_script(rank, world, runs):
    return [generate.main(rank, world, *run) for run in runs]


def test_generate_script_runs_the_config_layout(checkpoint, tmp_path, monkeypatch):
    """Galaxy with uneven lists on the command line, SP with shares (no seq_length), the pipeline
    config's own stages: every rank returns transformers' tokens."""
    monkeypatch.chdir(ROOT)  # the configs' paths
    tokenizer = str(tiny_llama_tokenizer(tmp_path))
    common = ["--checkpoint", str(checkpoint), "--prompt", "What is a list?", "--max_new_tokens", str(NEW_TOKENS),
              "--ignore_eos", "--tokenizer_file", tokenizer, "--world", "2"]
    layouts = [["--config_file", "train_config/llama/galaxy/full.json", "--tp_num_attention_heads_list", "[6,2]",
                "--tp_intermediate_size_list", "[64,32]", "--seq_scatter_list", "[3,1]", "--seq_length", "4"],
               ["--config_file", "train_config/llama/sp/full.json", "--seq_scatter_list", "[1,2]"],
               ["--config_file", "train_config/llama/pp/full.json"]]
    runs = [generate.parse(common + layout) for layout in layouts]
    assert [run[2].describe().split()[:4] for run in runs] == [["ATT=TP", "CON=SP", "MLP=TP", "tp=2"],
                                                               ["ATT=SP", "CON=SP", "MLP=SP", "tp=2"],
                                                               ["ATT=NONE", "CON=NONE", "MLP=NONE", "tp=1"]]
    prompt = torch.tensor([runs[0][0].prompt_ids])
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                          eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    results = run_ranks(_generate_script, 2, [(args, cfg, plan) for args, cfg, plan, _, _ in runs], timeout_s=300)
    assert all(got == [want] * len(layouts) for got in results)
