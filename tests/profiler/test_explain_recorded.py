"""--explain records one step of the real model (meta tensors, recording groups); here a real gloo
run of the same step is counted (galaxy.comm.stats) and each rank's bytes must equal the explained
ones per collective kind and phase (forward, backward, gradient sync): BERT, LLaMA and BART
(encoder and decoder) in the Galaxy layout, tiled overlap (its backward gathers are backward),
pipelines under 1F1B, GPipe, ZB-H1 and interleaved 1F1B, side-tuning, at world 2 and 3 with uneven splits;
ZeRO's gathers and reduce-scatters (stages 1 and 3, uneven shards)."""
import re
from collections import Counter

import pytest
import torch.distributed as dist

from galaxy.comm import stats
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.pipeline import PipelineForwardBackward, format_actions, schedule_actions
from galaxy.plan import build_plan
from galaxy.profiler.explain import bytes_by_label, explain, record_step
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from tests.comm.test_device import SHAPES, dataset
from tests.helpers import run_ranks

SPLITS = {2: {"bert": dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[40, 24]),
              "llama": dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[60, 36]),
              "bart": dict(tp_num_attention_heads_list=[3, 1], tp_intermediate_size_list=[64, 32])},
          3: {"bert": dict(tp_num_attention_heads_list=[2, 1, 1], tp_intermediate_size_list=[24, 24, 16]),
              "llama": dict(tp_num_attention_heads_list=[4, 2, 2], tp_intermediate_size_list=[48, 32, 16]),
              "bart": dict(tp_num_attention_heads_list=[2, 1, 1], tp_intermediate_size_list=[48, 32, 16])}}
SEQ = {2: [10, 6], 3: [6, 5, 5]}
STAGES = {2: [2, 1], 3: [1, 1, 1]}
CASES = {  # name: (model, layout keys beyond the uneven splits)
    "bert_tiles": ("bert", dict(parallel="galaxy", overlap_tiles=2)),
    "bert_side": ("bert", dict(parallel="galaxy", use_side=True, side_reduction_factor=4)),
    "bert_pp_1f1b": ("bert", dict(parallel="pp", pipeline_schedule="1f1b")),
    "bert_pp_gpipe": ("bert", dict(parallel="pp", pipeline_schedule="gpipe")),
    "bert_pp_zb": ("bert", dict(parallel="pp", pipeline_schedule="zb-h1")),
    "llama_galaxy": ("llama", dict(parallel="galaxy")),
    "llama_pp_1f1b": ("llama", dict(parallel="pp", pipeline_schedule="1f1b")),
    "llama_pp_interleaved": ("llama", dict(parallel="pp", pipeline_schedule="interleaved-1f1b", virtual_stages=2)),
    "bart_galaxy": ("bart", dict(parallel="galaxy")),
    "bart_tiles": ("bart", dict(parallel="galaxy", overlap_tiles=2)),
}


def config(name, world):
    model, layout = CASES[name]
    split = ({"stage_num_hidden_layers_list": STAGES[world], "num_microbatches": 2} if layout["parallel"] == "pp"
             else {**SPLITS[world][model], "seq_scatter_list": SEQ[world]})
    if layout.get("virtual_stages"):  # two chunks per rank, a layer each; micro-batches a multiple of the ranks
        split = dict(stage_num_hidden_layers_list=[1] * 2 * world, num_hidden_layers=2 * world, num_microbatches=world)
    return load_config(None, {**SHAPES[model], **split, **layout})


def _traced_bytes(rank, world, name):
    return _step_bytes(rank, world, config(name, world))


def _step_bytes(rank, world, cfg):
    """Bytes per label of one real optimizer step on this rank."""
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = build_model(cfg, ctx)
    apply_tuning(model, cfg, ctx)
    trainer = Trainer(model, ctx, cfg, dataset(cfg["model"], cfg), 1, log=lambda m: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    counts = Counter()
    with stats.listening(lambda kind, nbytes, phase, *_: counts.update({stats.label(kind, phase): nbytes})):
        trainer.train_step()
    return dict(counts)


def _every_case(rank, world):
    return {name: _traced_bytes(rank, world, name) for name in CASES}


@pytest.mark.parametrize("world", [2, 3])
def test_explained_bytes_are_traced_bytes(world):
    traced = run_ranks(_every_case, world, timeout_s=400)
    for name in CASES:
        cfg = config(name, world)
        plan = build_plan(cfg, world)
        for rank in range(world):
            explained = bytes_by_label(record_step(plan, cfg, rank, build_model)[0])
            assert explained == traced[rank][name], (name, world, rank)


def test_tiles_move_what_the_unfused_collectives_move_in_each_phase():
    for model in ("bert", "bart"):
        tiled = config(f"{model}_tiles", 3)
        plain = load_config(None, {**tiled, "overlap_tiles": 1})
        plan = build_plan(tiled, 3)
        for rank in range(3):
            assert (bytes_by_label(record_step(plan, tiled, rank, build_model)[0])
                    == bytes_by_label(record_step(plan, plain, rank, build_model)[0])), (model, rank)


def test_explain_text_starts_nothing():
    cfg = config("bert_pp_gpipe", 2)
    text = explain(build_plan(cfg, 2), cfg, build_model)
    assert not dist.is_initialized()
    assert "ownership:" in text and "bytes per optimizer step, per rank:" in text
    assert "stage 0: F0 F1 B0 B1" in text  # 2 micro-batches, 1 accumulation step
    cfg = config("bart_galaxy", 2)
    text = explain(build_plan(cfg, 2), cfg, build_model)
    assert "model.decoder.layers.1: forward" in text and "model.encoder.layers.0: backward" in text


def test_explain_prints_the_split_and_interleaved_schedules():
    for name, world in (("bert_pp_zb", 3), ("llama_pp_interleaved", 2)):
        cfg = config(name, world)
        plan = build_plan(cfg, world)
        text = explain(plan, cfg, build_model)
        steps = cfg["gradient_accumulation_steps"] * cfg["num_microbatches"]
        for stage in range(world):
            actions = schedule_actions(cfg["pipeline_schedule"], world, stage, steps, plan.virtual_stages)
            assert f"stage {stage}: {format_actions(actions)}" in text, (name, stage)
    assert "stage 0: F0 F1 B0 W0 B1 W1" in explain(build_plan(config("bert_pp_zb", 2), 2), config("bert_pp_zb", 2),
                                                   build_model)


def zero_config(stage):
    return load_config(None, {**SHAPES["bert"], "parallel": "dp", "zero_stage": stage, "zero_shard_list": [0.7, 0.3]})


def _zero_stages(rank, world):
    return {stage: _step_bytes(rank, world, zero_config(stage)) for stage in (1, 3)}


def test_explain_shows_zero_traffic_as_traced():
    traced = run_ranks(_zero_stages, 2)
    for stage in (1, 3):
        cfg = zero_config(stage)
        plan = build_plan(cfg, 2)
        for rank in range(2):
            assert bytes_by_label(record_step(plan, cfg, rank, build_model)[0]) == traced[rank][stage], (stage, rank)
    step = "(outside any layer): optimizer step\n    ZeRO parameters                all_gather(step)"
    assert step in explain(build_plan(zero_config(1), 2), zero_config(1), build_model)
    text = explain(build_plan(zero_config(3), 2), zero_config(3), build_model)  # each layer gathers its weights
    for layer, phase, kind in (("0", "forward", "all_gather "), ("1", "backward", "all_gather(bwd)")):
        assert re.search(rf"bert.encoder.layer.{layer}: {phase}.*\n    ZeRO parameters +{re.escape(kind)}", text), text
    assert "ZeRO gradients                 reduce_scatter(grad)" in text and "all_gather(step)" not in text
