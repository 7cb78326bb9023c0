"""Launching as users do: torchrun with a shipped config (whose init_method names a fixed
port), two local spawns of one config at once, a local run longer than its collective timeout,
SIGTERM to a spawning launcher (its ranks end within seconds; with --save_on_signal they save
first and --resume continues), and a failing rank reported in one line."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import procs

GALAXY = ["--config_file", "train_config/bert/galaxy/full.json", "--parallel", "galaxy"]
GALAXY2 = [*GALAXY, "--tp_num_attention_heads_list", "[1,1]", "--tp_intermediate_size_list", "[64,64]",
           "--seq_scatter_list", "[16,16]"]
STOP_LIMIT_S = 10  # "within seconds": what SIGTERM to the launcher may take to end every rank
SAVE_LIMIT_S = 30  # the same with a checkpoint saved first (ranks then exit normally: seconds under load)


@pytest.mark.parametrize("world, layout", [(2, GALAXY2), (3, [*GALAXY, *procs.GALAXY3])])
def test_torchrun_with_a_shipped_config(world, layout):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                "--master_port", str(procs.free_port())]
    argv = procs.command([*layout, "--max_steps", "1"])
    done = subprocess.run([*torchrun, *argv[1:]], cwd=procs.ROOT, env={**os.environ, "PYTHONPATH": str(procs.ROOT)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "step 1/1 |" in done.stdout, (done.stdout + done.stderr)[-3000:]


def test_two_local_spawns_of_one_config_at_once(tmp_path):
    runs = {i: procs.start([*GALAXY2, "--world", "2", "--max_steps", "2"], tmp_path / f"run{i}.log") for i in range(2)}
    codes = procs.finish(runs, 240)
    for i in runs:
        assert codes[i] == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]


def test_local_run_outlives_its_timeout(tmp_path):
    """A collective timeout of 3 s, a run of more than 36 s (the old spawner gave up at timeout_s + 30 = 33 s)."""
    args = [*GALAXY2, "--world", "2", "--timeout_s", "3", "--max_steps", "72", "--log_every", "24"]
    start = time.monotonic()
    run = procs.start(args, tmp_path / "run.log", "tests/scripts/patched_steps.py", env={"GALAXY_TEST_STEP_S": "0.5"})
    code = procs.finish({0: run}, 300)[0]
    log = (tmp_path / "run.log").read_text()
    assert code == 0 and "step 72/72 |" in log, log[-3000:]
    assert time.monotonic() - start > 36


def _children(pid):
    """Processes whose parent is pid (the spawned ranks and multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _sigterm_mid_run(tmp_path, extra):
    """Start a --world 2 launcher, SIGTERM it after step 3; returns (launcher, log, seconds until
    every process it started had ended). Every such process is killed before returning."""
    log = tmp_path / "run.log"
    launcher = procs.start([*GALAXY2, "--world", "2", "--max_steps", "100000", "--log_every", "1", *extra], log,
                           "tests/scripts/patched_steps.py", env={"GALAXY_TEST_STEP_S": "0.2"})
    children = []
    try:
        assert procs.wait_for(log, "step 3/", launcher), log.read_text()[-3000:]
        children = _children(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        start = time.monotonic()
        while any(map(_running, children)) and time.monotonic() - start < 60:
            time.sleep(0.1)
        return launcher, log.read_text(), time.monotonic() - start, len(children)
    finally:
        procs.finish({0: launcher}, 10)
        for pid in filter(_running, children):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_launcher_ends_every_rank(tmp_path):
    launcher, log, stop_s, n = _sigterm_mid_run(tmp_path, [])
    print(f"{n} processes ended {stop_s:.2f}s after SIGTERM")
    assert n >= 2 and stop_s < STOP_LIMIT_S, (stop_s, log[-3000:])
    assert launcher.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in log, log[-3000:]


def test_save_on_signal_then_resume(tmp_path):
    save = ["--save_dir", str(tmp_path / "ckpt")]
    launcher, log, stop_s, n = _sigterm_mid_run(tmp_path, ["--save_on_signal", *save])
    print(f"{n} processes ended {stop_s:.2f}s after SIGTERM (saving first)")
    assert stop_s < SAVE_LIMIT_S and launcher.returncode == 128 + signal.SIGTERM, (stop_s, log[-3000:])
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step-"), (saved, log[-3000:])
    step = int(saved[0].removeprefix("step-"))
    assert step >= 3 and f"after step {step}; saved training checkpoint" in log, log[-3000:]
    code, out = procs.run([*GALAXY2, "--world", "2", "--max_steps", str(step + 2), "--resume", "true", *save])
    assert code == 0 and f"resumed from step {step}" in out and f"step {step + 2}/{step + 2} |" in out, out[-3000:]


@pytest.mark.parametrize("debug", [False, True])
def test_failing_rank_is_one_line_unless_debug(tmp_path, debug):
    run = procs.start([*GALAXY2, "--world", "2", "--max_steps", "5", *(["--debug"] if debug else [])],
                      tmp_path / "run.log", "tests/scripts/patched_steps.py", env={"GALAXY_TEST_FAIL_RANK": "1"})
    code = procs.finish({0: run}, 240)[0]
    log = (tmp_path / "run.log").read_text()
    assert code == 1 and "galaxy: rank 1 failed: RuntimeError: injected failure after step 1" in log, log[-3000:]
    assert ("Traceback" in log) == debug, log[-3000:]
