"""benchmarks/replan.py: its rows and the after / planned ratio as pure functions, and one tiny
world end to end on loopback (a device throttled, the ranks move, the CSV), and over shaped links
in namespaces (root; slow)."""
import csv
import os
import shutil

import pytest

from benchmarks import replan

COLUMNS = ["link", "world", "devices_gflops", "slowed_gflops", "model", "layers", "seq", "repeat", "phase", "step",
           "requests", "median_ms", "min_ms", "max_ms", "split", "vs_planned", "vs_planned_min", "vs_planned_max"]
TINY = ["--model", "tiny", "--layers", "1", "--seq", "32", "--before", "2", "--after", "2",
        "--devices", "0.2,0.2", "--slowed", "0.2,0.05", "--patience", "2"]


def test_a_repeat_is_judged_by_its_medians_in_the_same_rounds():
    result = dict(before=[0.1, 0.2, 0.3], during=[0.5, 0.4], after=[0.3, 0.25, 0.2], planned=[0.2, 0.25, 0.1],
                  planned_during=[0.3, 0.2], moves=[(5, "even", "uneven", 0.05), (9, "uneven", "more", 0.02)],
                  planned_split="best")
    rows = {(r["phase"], r["step"]): r for r in replan.repeat_rows({"world": 2}, 1, result)}
    assert list(rows["after", ""]) == COLUMNS[1:2] + COLUMNS[7:]
    assert rows["after", ""]["median_ms"] == 250.0 and rows["after", ""]["vs_planned"] == round(0.25 / 0.2, 3)
    assert rows["during", ""]["vs_planned"] == round(0.45 / 0.25, 3) and rows["before", ""]["vs_planned"] == ""
    assert rows["move", 5]["median_ms"] == 50.0 and rows["move", 9]["split"] == "uneven -> more"
    assert rows["after", ""]["split"] == "uneven" and rows["planned", ""]["split"] == "best"
    summary = replan.summary_row({"world": 2}, [1.2, 1.0, 1.1])
    assert (summary["vs_planned"], summary["vs_planned_min"], summary["vs_planned_max"]) == (1.1, 1.0, 1.2)


@pytest.mark.parametrize("argv, message", [
    (["--devices", "16,16"], "--devices and --slowed go together"),
    (["--devices", "16,16", "--slowed", "8"], "--slowed"),
    (["--link", "fast"], "--link: rate 'fast'"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_flags_stop_before_any_rank_starts(argv, message, capsys):
    with pytest.raises(SystemExit):
        replan.main(argv)
    assert message in capsys.readouterr().err


def _check_csv(path, repeats):
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == COLUMNS
    phases = [r["phase"] for r in rows]
    assert phases[:4] == ["before", "during", "after", "planned"] and "move" in phases
    after, planned = (next(r for r in rows if r["phase"] == p) for p in ("after", "planned"))
    assert int(after["requests"]) == 2 and float(after["median_ms"]) > 0 and float(planned["median_ms"]) > 0
    assert float(after["vs_planned"]) == pytest.approx(float(after["median_ms"]) / float(planned["median_ms"]),
                                                       abs=2e-3)
    move = next(r for r in rows if r["phase"] == "move")
    assert int(move["step"]) > 2 and float(move["median_ms"]) > 0 and " -> " in move["split"]
    summary = rows[-1]
    assert summary["phase"] == "after / planned" and int(summary["requests"]) == repeats
    assert float(summary["vs_planned_min"]) <= float(summary["vs_planned"]) <= float(summary["vs_planned_max"])
    return rows


def test_one_tiny_world_end_to_end_on_loopback(tmp_path, capsys):
    replan.main([*TINY, "--repeats", "1", "--out_dir", str(tmp_path)])
    rows = _check_csv(tmp_path / "replan.csv", 1)
    assert rows[0]["link"] == "loopback" and rows[0]["slowed_gflops"] == "0.2/0.05"
    assert "after / planned over 1 repeat(s) that moved" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="network namespaces and tc need root and iproute2")
def test_repeats_over_a_shaped_link(tmp_path):
    replan.main([*TINY, "--link", "1gbit", "--repeats", "2", "--out_dir", str(tmp_path)])
    rows = _check_csv(tmp_path / "replan.csv", 2)
    assert rows[0]["link"] == "1gbit" and {r["repeat"] for r in rows} == {"1", "2", "all"}
