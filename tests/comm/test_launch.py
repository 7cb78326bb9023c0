"""Where ranks meet (command line > launcher's environment > config's init_method > default;
a local spawn on a free port) and the messages for non-numeric launcher variables."""
import argparse

import pytest

from galaxy.runtime import launch

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
