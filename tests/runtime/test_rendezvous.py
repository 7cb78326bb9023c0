"""Where ranks meet (command line > launcher's environment > config's init_method > default;
a local spawn on a free port), what --master_port's help says of it, the messages for
non-numeric launcher variables and a rank killed in a local spawn, what a local spawn says of the
cores its ranks share (and the spawns it refuses), and rank 0's count of the ranks that joined."""
import argparse
import json
import os
import re
import signal
import time
from urllib.parse import urlparse

import pytest

from galaxy.runtime import health, launch
from tests.helpers import ROOT

CONFIG = "tcp://127.0.0.1:23000"


def parse(*argv):
    parser = argparse.ArgumentParser()
    launch.add_launch_args(parser)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_precedence(monkeypatch):
    assert launch.init_method_from(parse(), None) == "tcp://127.0.0.1:29500"
    assert launch.init_method_from(parse(), "tcp://10.0.0.5") == "tcp://10.0.0.5:29500"  # a config without a port
    assert launch.init_method_from(parse(), CONFIG) == CONFIG
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29600")
    assert launch.init_method_from(parse(), CONFIG) == "tcp://10.0.0.7:29600"  # torchrun's rendezvous wins
    assert launch.init_method_from(parse("--master_port", "29700"), CONFIG) == "tcp://10.0.0.7:29700"
    assert launch.init_method_from(parse("--master_addr", "10.0.0.9"), CONFIG) == "tcp://10.0.0.9:29600"


def test_local_spawn_takes_a_free_port_unless_given():
    ports = {launch.init_method_from(parse(), CONFIG, local_spawn=True) for _ in range(3)}
    assert CONFIG not in ports and all(p.startswith("tcp://127.0.0.1:") for p in ports)
    assert launch.init_method_from(parse("--master_port", "29800"), CONFIG, local_spawn=True) == "tcp://127.0.0.1:29800"


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "two"), ("RANK", "0x"), ("MASTER_PORT", "")])
def test_non_numeric_launcher_variables_are_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"environment variable {name}='{value}' is not an integer"):
        launch.resolve_world_rank(parse())  # reads WORLD_SIZE and RANK; MASTER_PORT is read next
        launch.init_method_from(parse(), CONFIG)


def _killed_on_rank_1(rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # rank 0 outlives it: the launcher ends it


def test_a_killed_rank_is_named_and_no_traceback_is_offered():
    with pytest.raises(SystemExit) as stop:
        launch.run(_killed_on_rank_1, 2, None, timeout_s=30)
    assert stop.value.code == ("galaxy: rank 1 failed: its process was killed by SIGKILL before reporting a result "
                               "(no traceback exists)")


def test_port_help_says_where_the_default_comes_from():
    parser = argparse.ArgumentParser()
    launch.add_launch_args(parser)
    text = " ".join(parser.format_help().split())
    shipped = {urlparse(json.loads(p.read_text())["init_method"]).port for p in (ROOT / "train_config").rglob("*.json")
               if "init_method" in p.read_text()}
    assert len(shipped) == 1 and f"config's init_method (the shipped configs: {shipped.pop()})" in text, text
    assert "MASTER_PORT" in text and "a local spawn picks a free one" in text, text


def test_rank_0_says_who_has_joined_while_it_waits(monkeypatch, capsys):
    monkeypatch.setattr(health, "PROGRESS_S", 0.5)
    with pytest.raises(health.PeerError, match=r"rank\(s\) \[1, 2\] never joined the rendezvous"):
        health.Rendezvous(f"tcp://127.0.0.1:{launch.free_port()}", 0, 3, 2.0).join(2.0)
    waits = capsys.readouterr().err.splitlines()
    assert len(waits) >= 2 and all(re.fullmatch(r"galaxy: rank 0: waiting for ranks: 1/3 joined, \d s \(missing "
                                                r"\[1, 2\]; gives up at timeout_s 2\)", w) for w in waits), waits


def test_a_local_spawn_says_how_many_ranks_share_how_many_cores():
    assert launch.local_spawn_line(2, 4, 1) == "galaxy: starting 2 ranks here on 4 CPU cores, 1 torch thread each"
    assert launch.local_spawn_line(3, 2, 1) == ("galaxy: starting 3 ranks here on 2 CPU cores, 1 torch thread each; "
                                                "oversubscribed (3 threads on 2 cores): every step waits for the "
                                                "slowest rank, so expect it slow")
    assert "oversubscribed (8 threads on 4 cores)" in launch.local_spawn_line(2, 4, 4)
    launch.check_local_spawn(8, 2)  # 4 a core: slow, allowed
    with pytest.raises(ValueError, match=r"--world 64 would start 64 ranks on this machine's 2 CPU cores \(32 a core\); "
                                         r"a local spawn starts at most 4 ranks a core \(8 here\)"):
        launch.check_local_spawn(64, 2)
