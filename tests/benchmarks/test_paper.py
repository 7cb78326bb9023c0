"""benchmarks/paper.py: its judgements as pure functions, and one tiny row end to end (namespaces,
shaped links, emulated devices, the planner's check, every method, the CSV), which needs root."""
import csv
import os
import shutil
from types import SimpleNamespace

import pytest

from benchmarks import paper
from galaxy.planner.check import Verdict

COLUMNS = ["link", "world", "devices_gflops", "model", "layers", "seq", "method", "median_ms", "min_ms", "max_ms",
           "ideal_ms", "limit_ms", "sent_MB", "speedup_vs_tp", "speedup_vs_local", "planner_pick", "measured_gflops",
           "regime"]


def test_the_checks_pick_names_a_method_of_the_table():
    verdict = Verdict("galaxy x4", True, 3, {"local": [3.0], "galaxy x1": [2.0], "galaxy x4": [1.0]})
    assert paper.overlap_tiles(verdict) == 4 and paper.picked_method("galaxy x4", 4) == "galaxy_overlap"
    verdict = Verdict("tp", True, 3, {"tp": [1.0], "galaxy x1": [2.0], "galaxy x2": [2.5]})
    assert paper.overlap_tiles(verdict) == 1  # not picked: the leader of the planned Galaxy ones
    verdict = Verdict("galaxy x[1, 7]", True, 3, {"galaxy x1": [2.0], "galaxy x[1, 7]": [1.0]})
    assert paper.overlap_tiles(verdict) == [1, 7] and paper.picked_method("galaxy x[1, 7]", [1, 7]) == "galaxy_overlap"
    assert [paper.picked_method(n, 2) for n in ("local", "tp", "sp", "galaxy even", "galaxy x1")] == [
        "local", "tp", "sp_planned", "galaxy", "galaxy_planned"]


def test_the_pick_is_not_judged_against_a_method_running_its_very_model():
    candidates = {"galaxy": ({"parallel": "galaxy", "seq_scatter_list": [64, 64]}, 1.0),
                  "sp": ({"parallel": "sp", "seq_scatter_list": [64, 64]}, 1.0)}
    keys = paper.method_keys(candidates, 1)
    tiny = paper.MODELS["tiny"]
    assert paper.twins(keys, "sp_planned", tiny, 1, 128, 2) == ["sp"]  # even SP is [64, 64] too
    assert set(paper.twins(keys, "galaxy_overlap", tiny, 1, 128, 2)) == {"galaxy", "galaxy_planned"}  # tiles 1
    assert paper.twins(paper.method_keys(candidates, 4), "galaxy_overlap", tiny, 1, 128, 2) == []
    assert paper.twins(keys, "local", tiny, 1, 128, 2) == []
    uneven = dict(candidates, sp=({"parallel": "sp", "seq_scatter_list": [100, 28]}, 1.0))
    assert paper.twins(paper.method_keys(uneven, 1), "sp_planned", tiny, 1, 128, 2) == []


def test_torch_sends_what_a_ring_sends():
    cfg = dict(seq_length=128, hidden_size=1024, num_hidden_layers=4)
    activation = 128 * 1024 * 4
    assert paper.torch_sent(cfg, 2, False) == 4 * 2 * activation  # 2 all-reduces a layer, 1 activation each at p=2
    assert paper.torch_sent(cfg, 4, True) == 4 * 2 * 1.5 * activation + 3 * activation / 4  # + the output gather


def _row(devices, medians, sent_mb, bandwidth=1e7):
    flops = {"attention": 1.1e9, "mlp": 2.1e9, "connective": 1e6}
    cfg = dict(paper.MODELS["bert"], seq_length=128)
    seconds = {k: f / (devices[0] * 1e9) for k, f in flops.items()}  # every rank as fast as rank 0
    profile = dict(att_s_per_head=seconds["attention"] / cfg["num_attention_heads"],
                   mlp_s_per_column=seconds["mlp"] / cfg["intermediate_size"],
                   con_s_per_position=seconds["connective"] / 128)
    return dict(model="bert", seq=128, layers=4, devices=devices, flops=flops, bandwidth=bandwidth,
                profiles=[profile] * len(devices), times={m: [s] for m, s in medians.items()},
                sent={m: sent_mb * 1e6 for m in medians}, pick="galaxy_overlap")


def test_a_row_is_judged_against_its_limit_and_the_issues_targets():
    medians = dict(zip(paper.METHODS, (4.0, 2.0, 2.0, 2.0, 1.5, 1.4, 1.8, 2.1, 2.0), strict=True))
    row = _row([8.0, 4.0], medians, sent_mb=4.0)
    fig = paper.row_figures(row)
    per_layer = 1.1e9 + 2.1e9 + 2e6
    assert fig["ideal"] == pytest.approx(4 * per_layer / 12e9)
    tp_link = 2 * 128 * 1024 * 4 / 1e7  # two all-reduces of one activation per rank at world 2
    assert fig["ratio"] == pytest.approx(per_layer / 8e9 / tp_link) and fig["regime"] == "compute"
    assert fig["off"] == [False, True]  # both profiles ran at 8 GFLOP/s: rank 1's target is 4
    cells = paper.csv_rows("1gbit", row, medians, fig)
    assert list(cells[0]) == COLUMNS and [c["method"] for c in cells] == list(paper.METHODS)
    overlap = cells[paper.METHODS.index("galaxy_overlap")]
    assert overlap["limit_ms"] == round(max(fig["ideal"], 0.4) * 1e3, 1) and overlap["planner_pick"]
    assert overlap["speedup_vs_tp"] == round(2.0 / 1.4, 3) and overlap["measured_gflops"].endswith("(off)")
    judged = {name: (ratio, goal) for name, ratio, goal in paper.targets(row, medians, fig)}
    assert judged["galaxy_overlap vs tp"] == (pytest.approx(2.0 / 1.4), pytest.approx(1.35))  # 0.9 (s + 1) / 2, s = 2
    assert judged["pick vs best other"] == (pytest.approx(1.5 / 1.4), 1.0)
    assert judged["galaxy_overlap vs torch_tp_sp"][1] == 1.3 and "galaxy_overlap vs local" not in judged
    slow_link = _row([8.0, 4.0], medians, sent_mb=4.0, bandwidth=1e6)  # 4 s of bytes against a ~1 s ideal
    fig = paper.row_figures(slow_link)
    cells = {c["method"]: c for c in paper.csv_rows("10mbit", slow_link, medians, fig)}
    assert fig["regime"] == "link" and cells["tp"]["limit_ms"] == 4000.0
    assert "galaxy_overlap vs tp" not in {name for name, _, _ in paper.targets(slow_link, medians, fig)}


def test_without_flags_the_rows_are_the_grid_grouped_by_link_and_world():
    args = SimpleNamespace(links=None, devices=None, models=None, seqs=None, layers=4)
    groups = paper.row_specs(args)
    assert sum(len(specs) for _, specs in groups) == sum(
        len(b["links"]) * len(b["devices"]) * len(b["models"]) * len(b["seqs"]) for b in paper.GRID)
    assert all(len({len(s["devices"]) for s in specs}) == 1 for _, specs in groups)
    one = paper.row_specs(SimpleNamespace(links=["100mbit"], devices=["4,2,1,1"], models=None, seqs=None, layers=4))
    assert one == [("100mbit", [dict(devices=[4.0, 2.0, 1.0, 1.0], model="bert", seq=128, layers=4)])]


@pytest.mark.parametrize("argv, message", [
    (["--links", "fast"], "--links: rate 'fast'"),
    (["--devices", "4"], "--devices 4: two or more throughputs"),
    (["--devices", "2,4"], "the first the fastest"),
    (["--trial_repeats", "2"], "needs at least 3 rounds"),
])
def test_bad_flags_stop_before_anything_starts(argv, message, capsys):
    with pytest.raises(SystemExit):
        paper.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="network namespaces and tc need root and iproute2")
def test_one_tiny_row_end_to_end(tmp_path):
    paper.main(["--links", "1gbit", "--devices", "0.1,0.05", "--models", "tiny", "--seqs", "32", "--layers", "2",
                "--repeats", "1", "--trial_repeats", "3", "--tiles", "1", "2", "--out_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "paper.csv")))
    assert list(rows[0]) == COLUMNS and [r["method"] for r in rows] == list(paper.METHODS)
    assert sum(r["planner_pick"] == "True" for r in rows) == 1
    measured = [float(g) for g in rows[0]["measured_gflops"].split("/")]  # the emulation held its targets
    assert measured == [pytest.approx(0.1, rel=0.1), pytest.approx(0.05, rel=0.1)]
    for r in rows:
        assert float(r["limit_ms"]) >= float(r["ideal_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"])
        assert (float(r["sent_MB"]) == 0) == (r["method"] == "local")
    assert (tmp_path / "paper.svg").read_text().startswith("<svg")
