"""The parallel context owns the device: every tensor the engine creates lives on ctx.device.

Proof on a CPU machine: train under a default device of "meta" while ctx.device is the CPU. A
tensor the engine creates without naming its device lands on meta and the step fails (meta has
no values: a mixed-device op raises, `.item()` raises); a step that runs gives the same losses
as without the guard. Every layout of BERT, LLaMA and BART at world 2 with uneven splits.
"""
from contextlib import nullcontext

import pytest
import torch

from galaxy.comm.context import ParallelContext, resolve_device
from galaxy.runtime import launch
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.models.bert import BertConfig, BertForMaskedLM
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from tests.helpers import run_ranks
from tests.models.bart.test_bart_layouts import MODEL as BART, corpus
from tests.models.llama.common import MODEL as LLAMA, RandomInstructions

BERT = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3, vocab_size=64,
            seq_length=16, max_position_embeddings=16, batch_size=4, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1, data="synthetic", warmup_steps=1, bucket_size_mb=0.001)
SHAPES = {"bert": BERT, "llama": {**LLAMA, "num_hidden_layers": 3, "seq_length": 16},
          "bart": {**BART, "seq_length": 16, "hidden_dropout_prob": 0.1}}
SPLITS = {"bert": dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[40, 24]),
          "llama": dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[60, 36]),
          "bart": dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[64, 32])}
SEQ = dict(seq_scatter_list=[10, 6])
PP = dict(stage_num_hidden_layers_list=[2, 1], num_microbatches=2)
LAYOUTS = ("serial", "tp", "sp", "galaxy", "galaxy2", "dp", "pp", "galaxy_tiles")  # tiles: comm/compute overlap
MODELS = {"bert": (BertConfig, BertForMaskedLM), "llama": (LlamaConfig, LlamaForCausalLM),
          "bart": (BartConfig, BartForConditionalGeneration)}


def config(model_name, layout):
    split = {"serial": {}, "dp": {}, "pp": PP}.get(layout, {**SPLITS[model_name], **SEQ})
    if layout == "galaxy_tiles":
        layout, split = "galaxy", {**split, "overlap_tiles": 2}
    return load_config(None, {**SHAPES[model_name], **split, "parallel": layout})


def dataset(model_name, cfg):
    if model_name == "bert":
        return SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], num_samples=16)
    if model_name == "llama":
        return RandomInstructions(cfg["vocab_size"], cfg["seq_length"])
    return corpus(cfg["seq_length"], cfg["seed"])


def _cpu_step_counter(step):
    """torch's own non-fused AdamW keeps its step counter on the CPU by design (torch.tensor(0.)
    with no device): that tensor is torch's choice, not the engine's, so it is made outside the guard."""
    def run(*args, **kwargs):
        with torch.device("cpu"):
            return step(*args, **kwargs)
    return run


def _losses(model_name, layout, world, rank, guard):
    """Two optimizer steps of `layout`, built and run under the meta guard when `guard`."""
    cfg = config(model_name, layout)
    data = dataset(model_name, cfg)  # the caller's tensors, not the engine's
    config_class, model_class = MODELS[model_name]
    with torch.device("meta") if guard else nullcontext():
        plan = build_plan(cfg, 1 if layout == "serial" else world)
        ctx = ParallelContext.create(plan, rank if plan.world > 1 else 0)
        model = model_class(config_class.from_dict(cfg), ctx)
        apply_tuning(model, cfg, ctx)
        trainer = Trainer(model, ctx, cfg, data, 2, log=lambda m: None)
        trainer.opt.step = _cpu_step_counter(trainer.opt.step)
        if plan.pp_size > 1:
            trainer.forward_backward = PipelineForwardBackward(trainer)
        return [trainer.train_step()["loss"] for _ in range(2)]


def _guarded_and_plain(rank, world, model_name):
    layouts = [layout for layout in LAYOUTS if not (model_name == "bart" and layout == "pp")]  # BART has no PP
    return {layout: (_losses(model_name, layout, world, rank, True), _losses(model_name, layout, world, rank, False))
            for layout in layouts}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_tensor_follows_the_context_device(model_name):
    for rank, per_layout in enumerate(run_ranks(_guarded_and_plain, 2, model_name, timeout_s=300)):
        for layout, (guarded, plain) in per_layout.items():
            assert guarded == plain, (model_name, layout, rank, guarded, plain)


def test_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device(None, "gloo", 5) == torch.device("cpu")
    assert resolve_device(None, None, 0) == torch.device("cpu")  # world 1, no backend named
    assert resolve_device(None, "nccl", 5) == torch.device("cuda", 1)  # rank modulo the GPUs here
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's local rank wins
    assert resolve_device(None, "nccl", 5) == torch.device("cuda", 3)
    assert resolve_device("cpu", "nccl", 5) == torch.device("cpu")  # --device overrides
    assert resolve_device("cuda:2", "gloo", 5) == torch.device("cuda", 2)
    assert resolve_device("cuda", "gloo", 5) == torch.device("cuda", 3)  # this rank's GPU


def test_the_launcher_sets_the_gpu_the_context_names(monkeypatch):
    """init_distributed picks the GPU NCCL starts on by the rule resolve_device names the device by."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda *args, **kwargs: None)
    for local_rank in ("3", None):  # torchrun's LOCAL_RANK, then none: the rank modulo the GPUs
        if local_rank:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
        else:
            monkeypatch.delenv("LOCAL_RANK")
        launch.init_distributed(8, 5, "env://", "nccl")
        assert torch.device("cuda", chosen.pop()) == resolve_device(None, "nccl", 5)
