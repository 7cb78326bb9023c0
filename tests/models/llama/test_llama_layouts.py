"""Every layout of LLaMA (GQA, padded, prompt-masked batches) against the serial model: same
losses over 2 optimizer steps and same gradients at world 2 and 3 with uneven splits. The same
spawn checks that a Hugging Face checkpoint loads into uneven TP and saves back, and that TP
greedy generation (each rank caching its own KV heads) picks serial's tokens, and that side-tuning
(the side network reads the backbone's gathered layer outputs) trains as in serial in Galaxy."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.inference.generate import greedy_generate
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import rel_err, run_ranks
from tests.models.llama.common import MODEL, assert_matches_serial, train_two_steps
from tests.models.llama.reference import reference_logits, write_random_checkpoint

# GQA groups of 2 query heads stay whole: 8 heads / 4 KV heads -> [6, 2] / [3, 1] and [4, 2, 2] / [2, 1, 1]
SPLITS = {2: dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[64, 32], seq_scatter_list=[14, 10]),
          3: dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[48, 24, 24],
                  seq_scatter_list=[10, 8, 6])}
LAYOUTS = ["tp", "sp", "galaxy", "galaxy2", "dp"]
PROMPT = [[1, 17, 5, 42, 9]]


SIDE = {"use_side": True, "side_reduction_factor": 4}


def config(layout, world, **tuning):
    extra = {} if layout in ("serial", "dp") else SPLITS[world]
    return load_config(None, {**MODEL, **extra, **tuning, "parallel": layout})


def generate(cfg, plan, rank):
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), ParallelContext.create(plan, rank))
    return greedy_generate(model, torch.tensor(PROMPT), max_new_tokens=6)


def _all_layouts(rank, world, hf_dir, save_dir):
    out = {layout: train_two_steps(config(layout, world), build_plan(config(layout, world), world), rank)
           for layout in LAYOUTS}
    side = config("galaxy", world, **SIDE)
    out["galaxy, side-tuning"] = train_two_steps(side, build_plan(side, world), rank)
    tp = config("tp", world)
    plan = build_plan(tp, world)
    out["generated"] = generate(tp, plan, rank)
    model = LlamaForCausalLM.from_pretrained(hf_dir, ParallelContext.create(plan, rank))
    with torch.no_grad():
        out["hf_logits"] = model(torch.tensor(PROMPT))
    model.save_hf(save_dir)
    return out


@pytest.fixture(scope="module")
def serial():
    cfg, side = config("serial", 1), config("serial", 1, **SIDE)
    return (train_two_steps(cfg, build_plan(cfg, 1), 0), generate(cfg, build_plan(cfg, 1), 0),
            train_two_steps(side, build_plan(side, 1), 0))


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_match_serial(world, serial, tmp_path):
    (ref_losses, ref_grads), ref_tokens, side_ref = serial
    shape = {k: MODEL[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                   "num_hidden_layers", "vocab_size", "rope_theta", "hidden_act")}
    hf_dir = write_random_checkpoint(tmp_path / "hf", {**shape, "rms_norm_eps": 1e-6})
    results = run_ranks(_all_layouts, world, str(hf_dir), str(tmp_path / "saved"), timeout_s=300)
    want_logits = reference_logits(hf_dir, torch.tensor(PROMPT))
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    assert rel_err(saved(torch.tensor(PROMPT)).detach(), want_logits) < 1e-5
    for rank, out in enumerate(results):
        assert torch.equal(out.pop("generated"), ref_tokens), rank
        assert rel_err(out.pop("hf_logits"), want_logits) < 1e-5, rank
        side = out.pop("galaxy, side-tuning")
        assert side[1].keys() == side_ref[1].keys() and all("side" in k for k in side[1]), rank
        assert_matches_serial(side, side_ref, ("galaxy, side-tuning", rank))
        for layout, result in out.items():
            assert result[1].keys() == ref_grads.keys(), layout
            assert_matches_serial(result, (ref_losses, ref_grads), (layout, rank))
