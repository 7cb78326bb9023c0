"""Shared test helpers: run a function on N gloo ranks (free port, timeout) and collect results,
run an entry script, train a tiny LLaMA tokenizer on the shipped corpus."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from galaxy.data import train_sentencepiece
from galaxy.runtime.launch import spawn

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "python_docs"


# Ranks fork from a server that imported torch and the launcher once per test worker: a start costs
# ~0.07 s instead of ~2 s of imports (launch.spawn's start_method)
mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "galaxy.runtime.launch"])


def run_ranks(fn, world, *args, timeout_s=120.0):
    """fn(rank, world, *args) on `world` processes; returns the per-rank results. A test never
    waits longer than its collective timeout and a margin."""
    return spawn(fn, world, args, backend="gloo", timeout_s=timeout_s, limit_s=timeout_s + 30,
                 start_method="forkserver")


def rel_err(a, b, floor=1e-6):
    """||a - b|| / ||b||. The floor keeps gradients that are analytically zero (a key bias under
    softmax is one: it shifts every score of a row equally) from dividing rounding noise by ~0."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def grad_err(grad, serial, all_serial):
    """Relative error, against at least 1e-3 of the whole gradient's norm: some gradients are
    zero up to rounding (the key bias shifts every score of a query row alike, which softmax
    ignores), and rounding noise against rounding noise says nothing."""
    floor = 1e-3 * torch.stack([g.double().norm() for g in all_serial.values()]).norm()
    return ((grad.double() - serial.double()).norm() / torch.maximum(serial.double().norm(), floor)).item()


def run_script(script, *args, timeout=240):
    """Run one of the repository's entry scripts as a user would, from the repository root."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny_llama_tokenizer(directory, documents=60, vocab_size=300):
    """A kind="llama" SentencePiece model trained on the first shipped documents; returns its path."""
    lines = []
    with open(SHIPPED / "pretrain.jsonl", encoding="utf-8") as f:
        for line in itertools.islice(f, documents):
            row = json.loads(line)
            lines += [row["title"], *row["content"].split("\n")]
    return train_sentencepiece(lines, Path(directory) / "tiny", vocab_size, kind="llama")


def seeded(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)
