"""Never lose work: a non-finite step stops (or skips) and never replaces a finite checkpoint;
metrics stay valid JSON; unwritable outputs show before step 1; a save that fails mid-run leaves
the previous checkpoint; one run owns a save_dir at a time."""
import errno
import json
import signal
import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from galaxy.app import outputs
from galaxy.models.checkpoint import CheckpointError
from galaxy.train import checkpoint
from tests.helpers import run_ranks
from tests import procs
from tests.train.test_checkpoint import make_trainer, tiny_cfg, train

BLOW_UP = ["--lr", "1e9", "--max_grad_norm", "0"]  # step 1 is finite, step 2's loss is NaN


def strict_json_lines(path):
    """Each line parsed as standard JSON (a bare NaN or Infinity is an error)."""
    def reject(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def all_finite(directory):
    return all(torch.isfinite(t).all() for f in directory.glob("*.safetensors") for t in load_file(f).values())


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    save, metrics = tmp_path / "save", tmp_path / "metrics.jsonl"
    code, out = procs.run([*BLOW_UP, "--max_steps", "4", "--save_dir", str(save), "--save_every", "1",
                           "--keep_checkpoints", "1", "--metrics_file", str(metrics)])
    assert code == 1, out[-2000:]
    assert "step 2: non-finite loss or gradient norm" in out, out[-2000:]
    assert [step for step, _ in checkpoint.checkpoints(save)] == [1]
    assert all_finite(save / "step-00000001")
    assert not list(save.glob("*.safetensors"))  # no final export of a stopped run
    rows = strict_json_lines(metrics)
    assert [(r["step"], r["nonfinite"]) for r in rows] == [(1, False), (2, True)]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None


@pytest.mark.parametrize("layout", ["galaxy", "pp"])
def test_nonfinite_steps_are_skipped_by_every_rank_with_skip(tmp_path, layout):
    save, metrics = tmp_path / "save", tmp_path / "metrics.jsonl"
    # --timeout_s 120: a one-command spawn also ends the whole run after timeout_s + 30 s (issue 17, item 2)
    code, out = procs.run([*BLOW_UP, "--max_steps", "3", "--world", "2", "--parallel", layout, "--on_nonfinite", "skip",
                           "--save_dir", str(save), "--metrics_file", str(metrics), "--timeout_s", "120"])
    assert code == 0, out[-2000:]
    rows = strict_json_lines(metrics)
    assert [r["nonfinite"] for r in rows] == [False, True, True]
    assert rows[1]["lr"] == rows[2]["lr"]  # a skipped step does not advance the LR schedule
    assert "step 2: non-finite loss or gradient norm" in out and "skipped its optimizer step" in out
    assert "on_nonfinite skip: 2 of the 3 steps run took no optimizer step" in out, out[-2000:]
    assert all_finite(save)  # the export holds step 1's weights


def test_nonfinite_weights_never_replace_a_checkpoint(tmp_path):
    trainer = make_trainer(tiny_cfg())
    train(trainer, 1)
    checkpoint.save(trainer, tmp_path)
    train(trainer, 2)
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(CheckpointError, match="holds non-finite values at step 2"):
        checkpoint.save(trainer, tmp_path, keep=1)
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [1]


def fail_second_save_on_rank1(rank, world, save_dir):
    """Two saves at world 2; rank 1's disk is full at the second. Returns each rank's error."""
    trainer = make_trainer(tiny_cfg(parallel="galaxy", seq_scatter_list=[20, 12]), rank, world)
    train(trainer, 1)
    checkpoint.save(trainer, save_dir)
    train(trainer, 2)
    if rank == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", "rank-00001.model.safetensors")
        checkpoint.save_file = full  # this spawned process only
    try:
        checkpoint.save(trainer, save_dir)
    except CheckpointError as e:
        return str(e)


def test_failed_save_is_reported_by_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    errors = run_ranks(fail_second_save_on_rank1, 2, str(tmp_path), timeout_s=100)
    assert errors[0] == errors[1]
    assert "could not save" in errors[0] and "No space left on device" in errors[0], errors
    assert "is still step-00000001" in errors[0]
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".tmp-*"))  # the failed save's files are gone again
    kept = tmp_path / "step-00000001"
    assert all(checkpoint._verify(checkpoint._read_manifest(kept), kept, r) is None for r in (0, 1))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a small tmpfs directory (root only); unmounted afterwards."""
    mounted = []

    def mount(options):
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_or_full_save_dir_fails_before_step_1(tmpfs):
    code, out = procs.run(["--max_steps", "1", "--save_dir", str(tmpfs("size=1m,ro") / "save")])
    assert code == 1 and "is not writable (Read-only file system)" in out, out[-2000:]
    assert "step 1/" not in out
    code, out = procs.run(["--max_steps", "1", "--save_dir", str(tmpfs("size=256k"))])
    assert code == 1 and "MiB free; one checkpoint of this run takes about" in out, out[-2000:]
    assert "step 1/" not in out


def test_disk_full_mid_run_stops_with_the_previous_checkpoint_intact(tmpfs):
    save = tmpfs("size=2m")  # room for one checkpoint of the tiny model (about 1.3 MiB), not two
    code, out = procs.run(["--max_steps", "3", "--save_dir", str(save), "--save_every", "1"])
    assert code == 1, out[-2000:]
    assert "could not save" in out and "No space left on device" in out, out[-2000:]
    assert [step for step, _ in checkpoint.checkpoints(save)] == [1]
    assert not list(save.glob(".tmp-*"))


def test_second_run_on_a_save_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    save = tmp_path / "save"
    first = procs.start(["--max_steps", "100000", "--save_dir", str(save)], tmp_path / "first.log")
    try:
        assert procs.wait_for(tmp_path / "first.log", "step 1/", first)
        code, out = procs.run(["--max_steps", "1", "--save_dir", str(save)])
        assert code == 1, out[-2000:]
        assert f"is in use by another run: PID {first.pid} on host {socket.gethostname()}" in out, out[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    code, out = procs.run(["--max_steps", "1", "--save_dir", str(save)])
    assert code == 0, out[-2000:]
    assert f"taking over the stale lock {save / outputs.LOCK} of PID {first.pid}" in out
    assert not (save / outputs.LOCK).exists()  # released at the end


def test_lock_is_released_when_the_run_fails(tmp_path):
    code, out = procs.run([*BLOW_UP, "--max_steps", "3", "--save_dir", str(tmp_path)])
    assert code == 1, out[-2000:]
    assert not (tmp_path / outputs.LOCK).exists()


@pytest.mark.parametrize("source", ["--load_checkpoint", "--load_trainable"])
def test_a_run_whose_checkpoint_is_missing_creates_no_save_dir(tmp_path, source):
    """README's LoRA block once left an empty out/lora behind when out/base did not exist: inputs
    are checked before save_dir is created or any rank starts."""
    save, missing = tmp_path / "out" / "lora", tmp_path / "out" / "base"
    code, out = procs.run(["--max_steps", "1", "--use_lora", "true", source, str(missing), "--save_dir", str(save)])
    assert code == 1, out[-2000:]
    assert not (tmp_path / "out").exists()
    assert f"galaxy: {missing}: no model.safetensors" in out, out[-2000:]  # before any rank started
