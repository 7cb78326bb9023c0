"""Running pretrain_galaxy.py ranks as separate processes, as a user would in several terminals."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from galaxy.runtime.launch import free_port
from tests.helpers import ROOT

TIMEOUT_S = 20  # the ranks' --timeout_s: short, so a lost peer is noticed quickly
TINY = ["--config_file", "train_config/bert/full.json", "--hidden_size", "64", "--intermediate_size", "128", "--num_attention_heads", "2", "--num_hidden_layers", "2",
        "--seq_length", "32", "--batch_size", "6", "--vocab_size", "200", "--data", "synthetic",
        "--timeout_s", str(TIMEOUT_S), "--warmup_steps", "2", "--threads", "1"]
# three ranks split 4 heads, 128 columns and 32 positions unevenly
GALAXY3 = ["--parallel", "galaxy", "--num_attention_heads", "4", "--tp_num_attention_heads_list", "[2,1,1]",
           "--tp_intermediate_size_list", "[64,32,32]", "--seq_scatter_list", "[12,10,10]"]


def command(args, script="pretrain_galaxy.py"):
    return [sys.executable, str(ROOT / script), *TINY, *args]


def start(args, log, script="pretrain_galaxy.py", env=None):
    """Start one process (extra environment `env`), its stdout+stderr going to file `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = open(log, "w")
    return subprocess.Popen(command(args, script), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_ranks(world, args, logdir, ranks=None):
    port = free_port()
    return {r: start([*args, "--world", str(world), "--rank", str(r), "--master_port", str(port)],
                     Path(logdir) / f"rank{r}.log") for r in (range(world) if ranks is None else ranks)}


def wait_for(log, text, proc, limit_s=240):
    """Block until `text` appears in the log file (or the process ends / the limit passes)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if text in Path(log).read_text():
            return True
        if proc.poll() is not None:
            return text in Path(log).read_text()
        time.sleep(0.2)
    return False


def finish(procs, limit_s):
    """Exit codes after at most limit_s seconds; a process still running then is killed (rc None)."""
    deadline, codes = time.monotonic() + limit_s, {}
    for r, p in procs.items():
        try:
            codes[r] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes[r] = None
    return codes


def run(args, limit_s=240, script="pretrain_galaxy.py"):
    """One serial run to completion: (exit code, combined output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command(args, script), cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    return done.returncode, done.stdout + done.stderr


def losses(metrics_file):
    """Loss per step of a --metrics_file; a step run twice (before a kill and after the restart) keeps its last."""
    return {row["step"]: row["loss"] for row in map(json.loads, Path(metrics_file).read_text().splitlines())}
