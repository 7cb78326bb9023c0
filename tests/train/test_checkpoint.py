"""Training checkpoints: resume gives the losses of an uninterrupted run (serial and Galaxy at
world 2, fp32, dropout on), a save that dies half-way leaves the previous checkpoint loadable,
and damaged or mismatched checkpoints stop with an error naming the file or key."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.data import SyntheticMLM
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.registry import build_model
from galaxy.pipeline import PipelineForwardBackward
from galaxy.plan import build_plan
from galaxy.train import checkpoint
from galaxy.train.loop import Trainer
from galaxy.tuning.apply import apply_tuning
from tests.helpers import run_ranks
from tests.models.llama.common import RandomInstructions

TOTAL = 6
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
        "seq_length": 32, "batch_size": 4, "vocab_size": 200, "data": "synthetic", "max_steps": TOTAL,
        "warmup_steps": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def tiny_cfg(**over):
    return load_config(None, {**TINY, **over})


def make_trainer(cfg, rank=0, world=1):
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, ctx)
    apply_tuning(model, cfg, ctx)  # the config's method (full: nothing added, everything trains)
    data = (RandomInstructions(cfg["vocab_size"], cfg["seq_length"]) if cfg["model"] == "llama"
            else SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"], num_samples=64))
    trainer = Trainer(model, ctx, cfg, data, TOTAL, log=lambda msg: None)
    if ctx.plan.pp_size > 1:
        trainer.forward_backward = PipelineForwardBackward(trainer)
    return trainer


def train(trainer, until, metric="loss"):
    """`metric` of each step until step `until`."""
    values = []
    while trainer.step < until:
        values.append(trainer.train_step()[metric])
    return values


def straight_and_resumed(rank, world, cfg, save_dir):
    """Losses of 6 uninterrupted steps, and of 3 steps + save + fresh trainer + resume + 3 steps."""
    straight = train(make_trainer(cfg, rank, world), TOTAL)
    first = make_trainer(cfg, rank, world)
    head = train(first, 3)
    checkpoint.save(first, save_dir)
    second = make_trainer(cfg, rank, world)
    step = checkpoint.resume(second, save_dir)
    return straight, head + train(second, TOTAL), step


def test_resume_serial_gives_identical_losses(tmp_path):
    straight, resumed, step = straight_and_resumed(0, 1, tiny_cfg(), tmp_path)
    assert step == 3
    assert resumed == straight  # bit-identical, not just close


def test_resume_galaxy_world2_gives_identical_losses(tmp_path):
    cfg = tiny_cfg(parallel="galaxy", seq_scatter_list=[20, 12])  # uneven sequence split
    results = run_ranks(straight_and_resumed, 2, cfg, str(tmp_path))
    straight, resumed, step = results[0]
    assert step == 3 and resumed == straight
    manifest = json.loads((tmp_path / "step-00000003" / checkpoint.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(checkpoint._rank_files(0) + checkpoint._rank_files(1))


def test_resume_pipeline_world2_gives_identical_losses(tmp_path):
    cfg = tiny_cfg(stage_num_hidden_layers_list=[1, 1], num_microbatches=2, pipeline_schedule="1f1b")
    results = run_ranks(straight_and_resumed, 2, cfg, str(tmp_path))
    for straight, resumed, step in results:  # every stage reports the global loss
        assert step == 3 and resumed == straight


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    trainer = make_trainer(cfg)
    train(trainer, 2)
    checkpoint.save(trainer, tmp_path)
    train(trainer, 4)

    def die(tmp, final, manifest):  # every rank file is written; the manifest and rename never happen
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(checkpoint, "_publish", die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trainer, tmp_path)
    monkeypatch.undo()
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [2]
    assert (tmp_path / ".tmp-step-00000004").is_dir()  # the partial save is visible but never loads

    resumed = make_trainer(cfg)
    assert checkpoint.resume(resumed, tmp_path) == 2
    assert train(resumed, TOTAL) == train(make_trainer(cfg), TOTAL)[2:]
    checkpoint.save(resumed, tmp_path, keep=1)  # the next save clears the partial one and prunes
    assert not list(tmp_path.glob(".tmp-*"))
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [TOTAL]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    trainer = make_trainer(tiny_cfg())
    train(trainer, 1)
    return checkpoint.save(trainer, directory)


def rng_draws():
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def test_resume_restores_torch_python_and_numpy_rng_streams(tmp_path):
    trainer = make_trainer(tiny_cfg())
    train(trainer, 1)
    checkpoint.save(trainer, tmp_path)
    expected = rng_draws()  # what each stream gives next from where the checkpoint left it
    resumed = make_trainer(tiny_cfg())
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # another run's streams
    checkpoint.resume(resumed, tmp_path)
    assert rng_draws() == expected


def test_corrupt_file_is_named(saved, tmp_path):
    copy = tmp_path / saved.name
    shutil.copytree(saved, copy)
    victim = copy / "rank-00000.optim.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank-00000\.optim\.safetensors: sha256 does not match"):
        checkpoint.load(make_trainer(tiny_cfg()), copy)
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"rank-00000\.optim\.safetensors: missing"):
        checkpoint.load(make_trainer(tiny_cfg()), copy)


def test_mismatched_config_or_layout_is_refused(saved):
    with pytest.raises(CheckpointError, match=r"weight_decay: 0.01 -> 0.5"):
        checkpoint.load(make_trainer(tiny_cfg(weight_decay=0.5)), saved)
    trainer = make_trainer(tiny_cfg(max_steps=10, save_every=1, save_dir="elsewhere"))
    assert checkpoint.load(trainer, saved) == 1  # run length and saving may change on resume
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resume(trainer, saved)  # a step directory is not a save_dir
