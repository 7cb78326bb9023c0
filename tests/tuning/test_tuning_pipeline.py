"""Every tuning method under pipeline parallelism against the serial model, at world 2 with uneven
stages [3, 1] and 4 micro-batches, 1F1B (and GPipe for side-tuning), and side-tuning at world 3
with stages [2, 1, 1]: the same trainable gradients (synced and clipped, as the optimizer takes
them) and the same losses over two optimizer steps (so the stages' updates match too), rel. error
< 1e-5 fp32; frozen parameters get no gradient.
Side-tuning splits its side network by stage and passes the side state on beside the hidden
states: it is the case that exercises a second pipeline stream.

Gradients are compared at the first step only: Adam's first update moves each weight by about
lr * sign(grad), so rounding-level differences in near-zero gradient entries (micro-batch sums vs
one batch) become lr-sized weight differences; measured second-step gradient errors reach ~5e-6.

One spawn per world runs its (method, schedule) cases; the serial references run in the test process."""
import functools

import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.layers.param_spec import spec_of
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from tests.helpers import run_ranks
from tests.tuning.test_tuning_layouts import METHODS, grad_err, offset

TOL = 1e-5
STEPS = 2
MODEL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=4, vocab_size=64,
             seq_length=10, max_position_embeddings=16, batch_size=8, lora_dim=4, lora_alpha=8.0,
             adapter_reduction_dim=8, side_reduction_factor=4, non_linearity="gelu", data="synthetic",
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, lora_dropout=0.0,
             warmup_steps=1, max_grad_norm=1.0, seed=5)
# world -> (stages, (method, schedule) cases). World 2: every method under 1F1B, GPipe once on the
# two-stream case; world 3: side-tuning through a middle stage, which receives and sends the side state.
RUNS = {2: ([3, 1], [(method, "1f1b") for method in METHODS] + [("side", "gpipe")]),
        3: ([2, 1, 1], [("side", "1f1b")])}


def serial_name(name, p):
    """The last stage's copy of the tied embeddings is the embeddings in the serial model."""
    return spec_of(p).init_name or name


def train(cfg, world, rank):
    """STEPS optimizer steps of the tuned model; losses, trainable grads per step, frozen params with a grad."""
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = BertForMaskedLM(BertConfig.from_dict(cfg), ctx)
    apply_tuning(model, cfg, ctx)
    named = [(serial_name(n, p), p) for n, p in model.named_parameters()]
    with torch.no_grad():  # nonzero offsets, so zero-initialised factors (lora_B, side_upsample) matter
        for name, p in named:
            if p.requires_grad:
                p.add_(offset(name, p))
    trainer = Trainer(model, ctx, cfg, SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"]),
                      STEPS, log=lambda *_: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    grads, frozen = [], set()

    def capture():
        grads.append({n: p.grad.clone() for n, p in named if p.requires_grad})
        frozen.update(n for n, p in named if not p.requires_grad and p.grad is not None)

    trainer.before_update = capture
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    return {"losses": losses, "grads": grads, "frozen_grads": sorted(frozen)}


def _pipeline_cases(rank, world):
    stages, cases = RUNS[world]
    return {(method, schedule): train(load_config(None, {**MODEL, **METHODS[method], "num_microbatches": 4,
                                                         "stage_num_hidden_layers_list": stages,
                                                         "pipeline_schedule": schedule}), world, rank)
            for method, schedule in cases}


@functools.cache  # each method's serial reference once per test process, only if a case needs it
def serial(method):
    return train(load_config(None, {**MODEL, **METHODS[method]}), 1, 0)


@pytest.mark.parametrize("world", sorted(RUNS))
def test_every_method_under_pipeline_matches_serial(world):
    results = run_ranks(_pipeline_cases, world, timeout_s=240.0)
    cases = RUNS[world][1]
    assert set(results[0]) == set(cases)
    for (method, schedule) in cases:
        want = serial(method)
        stages = [r[(method, schedule)] for r in results]
        for rank, got in enumerate(stages):
            where = f"{method} {schedule} stage {rank}"
            for step, (loss, ref) in enumerate(zip(got["losses"], want["losses"], strict=True)):
                assert abs(loss - ref) <= TOL * abs(ref), f"{where} step {step + 1}: loss {loss} vs serial {ref}"
            ref = want["grads"][0]
            bad = {n: e for n, e in ((n, grad_err(g, ref[n], ref)) for n, g in got["grads"][0].items()) if not e < TOL}
            assert not bad, f"{where}: gradients differ from serial: {bad}"
            assert not got["frozen_grads"], f"{where}: frozen parameters got gradients {got['frozen_grads']}"
        # the stages together train exactly serial's parameters
        names = set().union(*(got["grads"][0] for got in stages))
        assert names == set(want["grads"][0]), f"{method} {schedule}: trainable parameters differ"
