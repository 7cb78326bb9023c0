"""Every tuning method under pipeline parallelism against the serial model, at world 2 with uneven
stages [3, 1] and 4 micro-batches, 1F1B (and GPipe for side-tuning): the same trainable gradients
(synced and clipped, as the optimizer takes them) and the same losses over two optimizer steps (so
the stages' updates match too), rel. error < 1e-5 fp32; frozen parameters get no gradient.
Side-tuning splits its side network by stage and passes the side state on beside the hidden
states: it is the case that exercises a second pipeline stream.

Gradients are compared at the first step only: Adam's first update moves each weight by about
lr * sign(grad), so rounding-level differences in near-zero gradient entries (micro-batch sums vs
one batch) become lr-sized weight differences; measured second-step gradient errors reach ~5e-6.

One spawn runs every (method, schedule) case; the serial references run in the test process."""
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.data import SyntheticMLM
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.tuning import apply_tuning
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.config import load_config
from galaxy.train.loop import Trainer
from tests.helpers import run_ranks
from tests.tuning.test_tuning_layouts import METHODS, grad_err, offset

TOL = 1e-5
STEPS = 2
MODEL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=4, vocab_size=64,
             seq_length=10, max_position_embeddings=16, batch_size=8, lora_dim=4, lora_alpha=8.0,
             adapter_reduction_dim=8, side_reduction_factor=4, non_linearity="gelu", data="synthetic",
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, lora_dropout=0.0,
             warmup_steps=1, max_grad_norm=1.0, seed=5)
PIPELINE = dict(stage_num_hidden_layers_list=[3, 1], num_microbatches=4)
CASES = [(method, "1f1b") for method in METHODS] + [("side", "gpipe")]  # GPipe: once, on the two-stream case


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


def serial_name(name, p):
    """The last stage's copy of the tied embeddings is the embeddings in the serial model."""
    return p.init_name if getattr(p, "pipeline_copy", False) else name


def _pipeline_cases(rank, world):
    return {(method, schedule): train(load_config(None, {**MODEL, **METHODS[method], **PIPELINE,
                                                         "pipeline_schedule": schedule}), world, rank)
            for method, schedule in CASES}


@pytest.fixture(scope="module")
def serial():
    return {method: train(load_config(None, {**MODEL, **keys}), 1, 0) for method, keys in METHODS.items()}


def test_every_method_under_pipeline_matches_serial(serial):
    results = run_ranks(_pipeline_cases, 2, timeout_s=240.0)
    assert set(results[0]) == set(CASES)
    for (method, schedule) in CASES:
        want = serial[method]
        stages = [r[(method, schedule)] for r in results]
        for rank, got in enumerate(stages):
            where = f"{method} {schedule} stage {rank}"
            for step, (loss, ref) in enumerate(zip(got["losses"], want["losses"])):
                assert abs(loss - ref) <= TOL * abs(ref), f"{where} step {step + 1}: loss {loss} vs serial {ref}"
            ref = want["grads"][0]
            bad = {n: e for n, e in ((n, grad_err(g, ref[n], ref)) for n, g in got["grads"][0].items()) if not e < TOL}
            assert not bad, f"{where}: gradients differ from serial: {bad}"
            assert not got["frozen_grads"], f"{where}: frozen parameters got gradients {got['frozen_grads']}"
        # the stages together train exactly serial's parameters
        names = set().union(*(got["grads"][0] for got in stages))
        assert names == set(want["grads"][0]), f"{method} {schedule}: trainable parameters differ"
