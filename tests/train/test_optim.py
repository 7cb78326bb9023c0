"""The LR schedule: every kind equals torch's own schedulers step by step, and a resumed run gives
each later step the learning rate of its own (possibly changed) schedule, as a fresh run of that
config would."""
import itertools
import json

import pytest
import torch

from galaxy.runtime.launch import free_port
from galaxy.train import checkpoint
from tests.helpers import run_script
from tests.train.test_checkpoint import make_trainer, tiny_cfg, train

LR = 5e-4


def torch_schedule_lrs(kind, warmup, total):
    """The LR each of `total` steps uses, from torch's schedulers: a linear warm-up from LR / warmup
    to LR over `warmup` steps, then linear decay to 0, cosine annealing to 0, or constant."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    after = {"linear": lambda: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=total - warmup),
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup),
             "constant": lambda: torch.optim.lr_scheduler.ConstantLR(opt, 1.0)}[kind]
    warm = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, after()], milestones=[warmup])
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_every_schedule_equals_torchs_own_schedulers(kind):
    trainer = make_trainer(tiny_cfg(lr_scheduler=kind, learning_rate=LR))  # 6 steps, 2 of warm-up
    assert train(trainer, trainer.total_steps, "lr") == pytest.approx(
        torch_schedule_lrs(kind, 2, trainer.total_steps), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("change", [dict(learning_rate=1e-3), dict(warmup_steps=4), dict(lr_scheduler="cosine"),
                                    dict(lr_scheduler="constant", warmup_steps=1)])
def test_a_resumed_run_follows_its_own_schedule_from_its_first_step(tmp_path, change):
    old = make_trainer(tiny_cfg())
    train(old, 3)
    checkpoint.save(old, tmp_path)
    new_cfg = tiny_cfg(**change)
    resumed = make_trainer(new_cfg)
    assert checkpoint.resume(resumed, tmp_path) == 3
    fresh = make_trainer(new_cfg)
    assert train(resumed, 6, "lr") == train(fresh, 6, "lr")[3:]


def pretrain_lrs(tmp_path, *args):
    metrics = tmp_path / "m.jsonl"
    metrics.unlink(missing_ok=True)
    out = run_script("pretrain_galaxy.py", "--config_file", "train_config/bert/full.json", "--master_port",
                     str(free_port()), "--hidden_size", "32", "--num_attention_heads", "2",
                     "--intermediate_size", "64", "--num_hidden_layers", "1", "--batch_size", "4",
                     "--seq_length", "16", "--warmup_steps", "2", "--metrics_file", str(metrics), *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return {m["step"]: m["lr"] for m in map(json.loads, metrics.read_text().splitlines())}


@pytest.mark.parametrize("length", [("--max_steps", "6", "12"), ("--num_epochs", "1", "2")])
def test_extending_a_run_trains_every_resumed_step_at_the_new_schedules_lr(tmp_path, length):
    """The issue's case: --max_steps 10 then --max_steps 20 --resume true ran step 11 at LR 0.0."""
    key, before, after = length
    corpus = tmp_path / "two_documents.jsonl"  # 28 sequences of 16 tokens: 7 steps an epoch
    with open("data/python_docs/pretrain.jsonl") as docs:
        corpus.write_text("".join(itertools.islice(docs, 2)))
    fresh = pretrain_lrs(tmp_path, key, after, "--data_file", str(corpus))
    save = ["--data_file", str(corpus), "--save_dir", str(tmp_path / "run")]
    first = pretrain_lrs(tmp_path, key, before, *save, "--save_every", "1000")
    extended = pretrain_lrs(tmp_path, key, after, *save, "--resume", "true", "--save_every", "1000")
    assert min(extended) == max(first) + 1 and extended == {s: fresh[s] for s in extended}
    assert max(extended) == max(fresh)
