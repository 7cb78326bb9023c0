"""benchmarks/elastic.py: a rank lost in place against a restart, and the survivors beside a model
planned for them from the start, end to end with a tiny model on loopback (and, slow, emulated
devices over shaped links in namespaces, world 4 -> 3, root)."""
import os
import re
import shutil

import pytest

from benchmarks import elastic

TINY = ["--model", "tiny", "--layers", "1", "--seq", "16", "--before", "1", "--after", "1", "--requests", "2"]


def _check(figures, out, world, restart=True):
    assert f"world {world} -> {world - 1}" in out and "rank 1 lost after request 1" in out
    assert 0 < figures["stop_in_place_s"] and re.search(r"in place\s+\d+\.\d\d\s+\d+\.\d\d", out)
    if restart:
        assert 0 < figures["stop_restart_s"] and re.search(r"restart\s+\d+\.\d\d", out)
        assert re.search(r"in place / restart: \d+\.\d\dx the stop", out)
    recovered = re.search(r"recovered in place .*?\s+2\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out)
    planned = re.search(r"planned for the survivors from the start .*?\s+2\s+([\d.]+)\s", out)
    assert recovered and planned, out
    assert float(recovered[1]) == pytest.approx(figures["recovered_ms"], abs=0.06)
    assert float(recovered[2]) == pytest.approx(figures["recovered_ms"] / figures["planned_ms"], abs=1e-3)
    assert float(planned[1]) == pytest.approx(figures["planned_ms"], abs=0.06)


def test_a_rank_lost_in_place_on_loopback(capsys):
    figures = elastic.main([*TINY, "--skip_restart"])
    out = capsys.readouterr().out
    _check(figures, out, 3, restart=False)
    assert figures["stop_restart_s"] is None and "restart" not in out


@pytest.mark.slow
def test_in_place_against_a_restart_on_loopback(capsys):
    figures = elastic.main(TINY)
    _check(figures, capsys.readouterr().out, 3)


@pytest.mark.parametrize("argv, message", [
    (["--world", "2"], "world 2: losing rank 1 in place needs 3 ranks or more"),
    (["--devices", "8,0,8"], "--devices"),
    (["--link", "fast"], "--link: rate 'fast'"),
])
def test_bad_flags_stop_before_any_rank_starts(argv, message, capsys):
    with pytest.raises(SystemExit):
        elastic.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="network namespaces and tc need root and iproute2")
def test_world_4_to_3_of_emulated_devices_over_a_shaped_link(capsys):
    figures = elastic.main([*TINY, "--devices", "0.2,0.2,0.2,0.2", "--link", "1gbit"])
    out = capsys.readouterr().out
    _check(figures, out, 4)
    assert "tbf rate 1gbit" in out or "netem rate 1gbit" in out
