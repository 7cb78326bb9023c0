"""galaxy.profiler.memory (python -m galaxy.memory): the meta-device estimate against real built
models and a real step's live bytes, and a training run's --memory_report."""
import re

import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.profiler.explain import build_trainer
from galaxy.profiler.memory import LiveBytes, estimate, peak_bytes, saved_bytes
from galaxy.train.optim import optimizer_state_bytes
from galaxy.train.zero import model_state_bytes
from tests.helpers import ROOT, run_ranks, run_script

SMALL = {"batch_size": 4, "seq_length": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def config(path, **keys):
    return load_config(str(ROOT / "train_config" / path), {**SMALL, **keys})


def real_rank(rank, world, plan, cfg):
    """A real rank's step peak (live bytes) and the model state its tensors hold after it."""
    trainer = build_trainer(ParallelContext.create(plan, rank, "cpu"), cfg, build_model)
    peak = peak_bytes(trainer)
    return peak, {**model_state_bytes(trainer), "optimizer": optimizer_state_bytes(trainer.opt)}


def meta_trainer(plan, cfg, rank):
    return build_trainer(ParallelContext.recording(plan, rank), cfg, build_model)


@pytest.mark.parametrize("path,world,keys", [
    ("bert/full.json", 1, {}),
    ("bert/galaxy/uneven.json", 2, {"seq_length": 128}),  # its seq_scatter_list [80, 48]
    ("bert/full.json", 2, {"zero_stage": 1, "zero_shard_list": [0.7, 0.3]}),
    ("bert/full.json", 2, {"zero_stage": 2, "zero_shard_list": [0.7, 0.3]}),
    ("bert/full.json", 2, {"zero_stage": 3, "zero_shard_list": [0.7, 0.3]}),
    ("bert/pp/full.json", 4, {"zero_stage": 1, "batch_size": 8}),  # 2 stages x 2 replicas, the last a tied copy
])
def test_estimate_matches_real_ranks(path, world, keys):
    cfg = config(path, **keys)
    plan = build_plan(cfg, world)
    real = run_ranks(real_rank, world, plan, cfg)
    for rank, (peak, held) in enumerate(real):
        assert model_state_bytes(meta_trainer(plan, cfg, rank)) == held  # model state: exact, AdamW's real state
        predicted = peak_bytes(meta_trainer(plan, cfg, rank))
        assert abs(predicted / peak - 1) < 0.10, (rank, predicted, peak)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_match_a_real_forward(checkpointing):
    cfg = config("bert/full.json", activation_checkpointing=checkpointing)
    plan = build_plan(cfg, 1)
    torch.manual_seed(0)
    real = saved_bytes(build_trainer(ParallelContext.create(plan, 0, "cpu"), cfg, build_model))
    predicted = estimate(plan, cfg, 0)["activations_ckpt" if checkpointing else "activations"]
    assert real > 0 and abs(predicted / real - 1) < 0.10, (predicted, real)


def test_live_bytes_counts_each_storage_while_alive():
    with LiveBytes() as live:
        x = torch.ones(2**18)  # 1 MiB
        y = x * 2
        x.view(2, -1).add_(1)  # a view and an in-place op allocate nothing
        del x
    assert (live.now, live.peak) == (2**20, 2**21)
    del y


def test_cli_prints_every_rank():
    out = run_script("-m", "galaxy.memory", "--config_file", "train_config/bert/galaxy/uneven.json", "--world", "2",
                     "--batch_size", "4")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2 and rows[0] != rows[1]  # uneven split: the ranks differ


@pytest.mark.parametrize("args,message", [
    (["--config_file", "train_config/bert/pp/full.json", "--world", "3"], "world size 3 is not a multiple"),
    (["--config_file", "train_config/bert/full.json", "--world", "1", "--zero_stage", "1"], "'zero_stage'"),
    (["--world", "1"], "--config_file is required"),
])
def test_cli_names_bad_input(args, message):
    out = run_script("-m", "galaxy.memory", *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr


MIB = r"([\d.]+)"
STATE = rf"{MIB} MiB = params {MIB} \+ grads {MIB} \+ optimizer {MIB}"


def _mib(n):
    return f"{n / 2**20:.2f}"


@pytest.mark.parametrize("path,keys", [
    ("bert/dp/full.json", {"zero_stage": 3}),
    pytest.param("bert/galaxy/full.json", {}, marks=pytest.mark.slow),  # test_estimate_matches_real_ranks has it
])
def test_training_run_reports_memory_beside_the_prediction(path, keys):
    """Every rank prints its model state (model_state_bytes of its tensors) beside the prediction at
    start-up, and after step 2 its measured peak within 10% of the predicted one."""
    keys = {"batch_size": 4, "seq_length": 32, "data": "synthetic", **keys}
    out = run_script("pretrain_galaxy.py", "--config_file", f"train_config/{path}", "--world", "2", "--max_steps", "2",
                     "--memory_report", *[str(a) for k, v in keys.items() for a in (f"--{k}", v)])
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = config(path, **keys)
    plan = build_plan(cfg, 2)
    for rank in range(2):
        start = re.search(rf"\[rank {rank}\] model state on this rank \(zero_stage \d\): {STATE}; predicted {STATE}",
                          out.stdout)
        held = model_state_bytes(meta_trainer(plan, cfg, rank))
        expected = [_mib(sum(held.values()))] + [_mib(held[k]) for k in ("params", "grads", "optimizer")]
        assert start and list(start.groups()) == expected * 2, out.stdout
        step = re.search(rf"\[rank {rank}\] memory in step 2: peak {MIB} MiB \(live tensor bytes\), predicted {MIB} "
                         rf"MiB \([+-][\d.]+%\); optimizer state {MIB} MiB, predicted {MIB} MiB", out.stdout)
        assert step, out.stdout
        measured, predicted, optimizer, optimizer_predicted = map(float, step.groups())
        assert abs(predicted / measured - 1) < 0.10 and optimizer == optimizer_predicted == float(expected[3])

