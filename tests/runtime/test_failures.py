"""Ranks as separate processes: a killed rank, a rank that never starts, a taken port and
ranks started with different configs make every other rank exit non-zero within
timeout_s + 30 s, with a message naming the rank. A rank killed while saving a checkpoint
leaves the previous one loadable, and the resumed run gives the uninterrupted run's losses."""
import signal
import socket

import pytest

from galaxy.app.outputs import LOCK
from tests import procs

GRACE_S = procs.TIMEOUT_S + 30


@pytest.mark.parametrize("world, victim, extra", [
    (2, 1, ["--parallel", "galaxy"]),
    (3, 0, procs.GALAXY3),  # rank 0 also hosts the rendezvous store
])
def test_killed_rank_stops_the_others(tmp_path, world, victim, extra):
    ranks = procs.start_ranks(world, [*extra, "--max_steps", "100000", "--log_every", "1"], tmp_path)
    try:
        # rank 0 prints the loss; after its first step every rank is inside training
        assert procs.wait_for(tmp_path / "rank0.log", "step 1/", ranks[0]), (tmp_path / "rank0.log").read_text()
        ranks[victim].send_signal(signal.SIGKILL)
        codes = procs.finish(ranks, GRACE_S)
    finally:
        procs.finish(ranks, 1)
    for r in ranks:
        if r == victim:
            continue
        log = (tmp_path / f"rank{r}.log").read_text()
        assert codes[r] not in (0, None), f"rank {r} exit {codes[r]}:\n{log[-2000:]}"
        assert f"[{victim}] stopped responding / lost" in log or f"rank {victim} (host of the rendezvous" in log, log[-2000:]


def test_rank_that_never_starts_is_named(tmp_path):
    ranks = procs.start_ranks(2, ["--parallel", "galaxy", "--max_steps", "2"], tmp_path, ranks=[0])
    codes = procs.finish(ranks, GRACE_S + 60)  # + start-up of a loaded machine
    log = (tmp_path / "rank0.log").read_text()
    assert codes[0] not in (0, None) and "rank(s) [1] never joined the rendezvous" in log, log[-2000:]


def test_port_in_use_and_config_mismatch(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = procs.run(["--world", "2", "--rank", "0", "--master_port", str(port), "--max_steps", "1"])
    assert code != 0 and f"127.0.0.1:{port} is already in use by another program" in out, out[-2000:]

    port = procs.free_port()
    ranks = {r: procs.start(["--parallel", "galaxy", "--world", "2", "--rank", str(r), "--master_port", str(port),
                             "--max_steps", "2", "--lr", str(0.001 * (r + 1))], tmp_path / f"rank{r}.log")
             for r in range(2)}
    codes = procs.finish(ranks, GRACE_S + 60)
    for r in range(2):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert codes[r] not in (0, None), log[-2000:]
        assert "ranks were started with different configs: rank 1: learning_rate=0.002 (rank 0: 0.001)" in log, log


def test_kill_during_save_then_resume(tmp_path):
    """Serial: SIGKILL inside the save of step 4 (rank files written, manifest not), resume from step 2."""
    common = ["--max_steps", "6", "--save_dir", str(tmp_path / "ckpt"), "--save_every", "2"]
    code, out = procs.run([*common[:2], "--metrics_file", str(tmp_path / "straight.jsonl")])
    assert code == 0, out
    code, out = procs.run([*common, "--metrics_file", str(tmp_path / "crash.jsonl")], script="tests/scripts/die_in_save.py")
    assert code == -signal.SIGKILL, out
    # the killed run's lock stays behind, stale: the resumed run takes it over
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LOCK, ".tmp-step-00000004", "step-00000002"]
    code, out = procs.run([*common, "--resume", "true", "--metrics_file", str(tmp_path / "resumed.jsonl")])
    assert code == 0 and "resumed from step 2" in out and "taking over the stale lock" in out, out
    straight, resumed = procs.losses(tmp_path / "straight.jsonl"), procs.losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)
