"""Every layout of LLaMA (GQA, padded, prompt-masked batches) against the serial model: same
losses over 2 optimizer steps and same gradients at world 2 and 3 with uneven splits. The same
spawn checks that a Hugging Face checkpoint loads into uneven TP and saves back, and that TP
greedy generation (each rank caching its own KV heads) picks serial's tokens."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.models.checkpoint import gather_full_state
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.models.llama.generate import greedy_generate
from galaxy.plan import build_plan
from galaxy.train.config import load_config
from galaxy.train.loop import Trainer
from tests.helpers import rel_err, run_ranks
from tests.models.llama.reference import reference_logits, write_random_checkpoint

MODEL = dict(model="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
             num_hidden_layers=2, vocab_size=100, seq_length=24, rope_theta=500000.0, hidden_act="silu",
             batch_size=6, gradient_accumulation_steps=2, warmup_steps=1, max_grad_norm=1.0, bucket_size_mb=0.01)
# GQA groups of 2 query heads stay whole: 8 heads / 4 KV heads -> [6, 2] / [3, 1] and [4, 2, 2] / [2, 1, 1]
SPLITS = {2: dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[64, 32], seq_scatter_list=[14, 10]),
          3: dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[48, 24, 24],
                  seq_scatter_list=[10, 8, 6])}
LAYOUTS = ["tp", "sp", "galaxy", "galaxy2", "dp"]
PROMPT = [[1, 17, 5, 42, 9]]


class RandomInstructions:
    """Random token rows of seq_length: a masked prompt, an answer, right padding (mask 0)."""

    def __init__(self, vocab, seq_length, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        pos = torch.arange(seq_length)[None]
        lengths = torch.randint(seq_length // 2, seq_length + 1, (n, 1), generator=g)
        prompts = torch.randint(2, seq_length // 2, (n, 1), generator=g)
        self.mask = (pos < lengths).long()
        self.ids = torch.randint(4, vocab, (n, seq_length), generator=g).masked_fill(self.mask == 0, 3)
        self.labels = self.ids.masked_fill((pos < prompts) | (self.mask == 0), -100)

    def __len__(self):
        return len(self.ids)

    def get_batch(self, indices):
        return {"input_ids": self.ids[indices], "attention_mask": self.mask[indices], "labels": self.labels[indices]}


def config(layout, world):
    extra = {} if layout in ("serial", "dp") else SPLITS[world]
    return load_config(None, {**MODEL, **extra, "parallel": layout})


def train_two_steps(cfg, plan, rank):
    """Losses of 2 optimizer steps and the gradients (full, HF-named) of the second."""
    ctx = ParallelContext.create(plan, rank)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)
    trainer = Trainer(model, ctx, cfg, RandomInstructions(cfg["vocab_size"], cfg["seq_length"]), 2, log=lambda m: None)
    grads = {}
    trainer.before_update = lambda: grads.update(gather_full_state(model, ctx, model.to_hf, lambda p: p.grad))
    return [trainer.train_step()["loss"] for _ in range(2)], grads


def generate(cfg, plan, rank):
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), ParallelContext.create(plan, rank))
    return greedy_generate(model, torch.tensor(PROMPT), max_new_tokens=6)


def _all_layouts(rank, world, hf_dir, save_dir):
    out = {layout: train_two_steps(config(layout, world), build_plan(config(layout, world), world), rank)
           for layout in LAYOUTS}
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
    cfg = config("serial", 1)
    return train_two_steps(cfg, build_plan(cfg, 1), 0), generate(cfg, build_plan(cfg, 1), 0)


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_match_serial(world, serial, tmp_path):
    (ref_losses, ref_grads), ref_tokens = serial
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
        for layout, (losses, grads) in out.items():
            for got, want in zip(losses, ref_losses):
                assert abs(got - want) / abs(want) < 1e-5, (layout, rank, losses, ref_losses)
            assert grads.keys() == ref_grads.keys(), layout
            for name, g in grads.items():
                assert rel_err(g, ref_grads[name]) < 1e-5, (layout, rank, name, rel_err(g, ref_grads[name]))
