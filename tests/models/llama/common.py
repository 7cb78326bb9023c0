"""What the LLaMA layout tests share: a tiny GQA model config, prompt-masked padded batches, and
two optimizer steps through the real Trainer (pipeline schedule when the plan has stages)."""
import torch

from galaxy.comm.context import ParallelContext
from galaxy.models.checkpoint import gather_full_state
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from tests.helpers import rel_err

MODEL = dict(model="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
             num_hidden_layers=2, vocab_size=100, seq_length=24, rope_theta=500000.0, hidden_act="silu",
             batch_size=6, gradient_accumulation_steps=2, warmup_steps=1, max_grad_norm=1.0, bucket_size_mb=0.01,
             # Adam's first step divides a gradient element by (|g| + eps): at eps 1e-8, an element that cancels to
             # 2e-9 with 7e-10 of rounding noise (measured at world 3) moves by 5 % of the learning rate more or
             # less, and step 2's gradients then differ by 1.4e-5; at 1e-6 by 1e-6
             adam_eps=1e-6)


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


def train_two_steps(cfg, plan, rank):
    """Losses of 2 optimizer steps and the gradients (full, HF-named) of the second. A pipeline
    stage returns only its own parameters' gradients (tied copies under the original's name)."""
    ctx = ParallelContext.create(plan, rank)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), ctx)
    apply_tuning(model, cfg, ctx)  # the config's method (full: nothing added, everything trains)
    trainer = Trainer(model, ctx, cfg, RandomInstructions(cfg["vocab_size"], cfg["seq_length"]), 2, log=lambda m: None)
    if plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    grads = {}
    trainer.before_update = lambda: grads.update(gather_full_state(model, ctx, model.to_hf, lambda p: p.grad,
                                                                   trainable_only=True))
    return [trainer.train_step()["loss"] for _ in range(2)], grads


def assert_matches_serial(result, serial, where):
    """Both losses and every gradient in `result` (a train_two_steps result) equal serial's
    within fp32 rounding (rel. error < 1e-5); `where` names the run in failures."""
    (losses, grads), (ref_losses, ref_grads) = result, serial
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(got - want) / abs(want) < 1e-5, (where, losses, ref_losses)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-5, (where, name, rel_err(g, ref_grads[name]))
