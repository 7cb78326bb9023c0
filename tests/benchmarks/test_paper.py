"""benchmarks/paper.py without root: its choices as pure functions, and the ranks' whole path
(profile on a slowed rank, plan, choose tiles, time and count every method, torch's peers) at
world 2 on loopback at tiny sizes. The namespaces and the shaped link need root: not here."""
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from benchmarks import paper
from benchmarks.vs_torch_tp import TorchTP
from tests.helpers import rel_err, run_ranks

TINY = {"bert": dict(model="bert", hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100),
        "llama": dict(model="llama", hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100)}


def test_the_prediction_picks_the_layout_predicted_fastest():
    assert paper.planner_pick({"local": 0.3, "sp": 0.5, "galaxy": 0.4}) == "local"
    assert paper.planner_pick({"local": 0.6, "sp": 0.5, "galaxy": 0.4}) == "galaxy_overlap"
    assert paper.planner_pick({"local": 0.6, "sp": 0.3, "galaxy": 0.4}) == "sp_planned"


def test_method_keys_put_the_planned_splits_and_tiles_into_configs():
    planned = {"parallel": "galaxy", "seq_scatter_list": [3, 1]}
    sp = {"parallel": "sp", "seq_scatter_list": [2, 2]}
    keys = paper.method_keys({"galaxy": (planned, 1.0), "sp": (sp, 1.0), "local": ({}, 1.0)}, tiles=4)
    assert set(keys) | {"torch_tp", "torch_tp_sp"} == set(paper.METHODS)
    assert keys["galaxy_overlap"] == dict(planned, overlap_tiles=4) and keys["sp_planned"] == sp
    cfg = paper.paper_cfg(TINY["llama"], 1, 8, **keys["galaxy_overlap"])
    assert (cfg["model"], cfg["overlap_tiles"], cfg["seq_scatter_list"], cfg["batch_size"]) == ("llama", 4, [3, 1], 1)


def test_speedups_judge_the_pick_against_every_other_method():
    medians = dict(zip(paper.METHODS, (1.0, 4.0, 3.0, 3.5, 2.0, 1.5, 2.5, 5.0, 6.0), strict=True))
    ratios, best_other = paper.speedups(medians, "local")
    assert best_other == "galaxy_overlap"
    assert ratios["planner vs tp"] == 4.0 and ratios["planner vs best other"] == 1.5
    assert ratios["galaxy_overlap vs tp"] == pytest.approx(4.0 / 1.5)
    assert ratios["tp vs torch_tp"] == 5.0 / 4.0 and ratios["planner vs torch_tp_sp"] == 6.0


def _rows_and_peers(rank, world, models, opts):
    rows = paper.measure_rows(rank, world, models, opts)
    mesh = init_device_mesh("cpu", (world,))
    cfg = paper.paper_cfg(models["llama"], 2, 8, parallel="serial")
    with torch.no_grad():
        tp, tp_sp = (TorchTP(f"peer{sp}", cfg, rank, mesh, sp).infer() for sp in (False, True))
    return rows, rel_err(tp_sp, tp)


def test_ranks_profile_plan_and_time_every_method_at_world_2():
    opts = SimpleNamespace(seqs=[8], slow=[3], layers=1, repeats=1, tiles=[1, 2], trial_repeats=3)
    (rows, peers_differ), (rows1, _) = run_ranks(_rows_and_peers, 2, TINY, opts)
    assert [(r["tiles"], r["pick"]) for r in rows] == [(r["tiles"], r["pick"]) for r in rows1]  # one choice
    assert peers_differ < 1e-5  # torch's LLaMA peer: TP and TP + SequenceParallel compute the same
    assert [(r["model"], r["seq"], r["slow"]) for r in rows] == [("bert", 8, 3), ("llama", 8, 3)]
    for row in rows:
        assert set(row["times"]) == set(paper.METHODS) and all(len(t) == 1 for t in row["times"].values())
        assert row["sent"]["local"] == 0 and all(row["sent"][m] > 0 for m in ("tp", "sp", "galaxy", "galaxy_overlap"))
        assert row["predicted_pick"] == paper.planner_pick(row["predicted"]) and row["tiles"] in (1, 2)
        assert set(row["check"]) == {"local", "sp", "galaxy x1", "galaxy x2"} and row["check_rounds"] == 3
        picked = {"local": "local", "sp_planned": "sp", "galaxy_overlap": f"galaxy x{row['tiles']}"}[row["pick"]]
        assert row["check"][picked][1] == row["check_rounds"]  # the pick ran every round of the check
        assert sum(row["splits"]["galaxy_planned"]["seq_scatter_list"]) == 8 and len(row["profiles"]) == 2
    cells, group, medians = paper.report_row("loopback", rows[1])
    assert group == "loopback llama s8 x3" and set(medians) == set(paper.METHODS)
    assert [c["method"] for c in cells] == list(rows[1]["times"]) and sum(c["planner_pick"] for c in cells) == 1
    assert cells[0]["predicted_ms"] == round(rows[1]["predicted"]["local"] * 1e3, 1) and cells[-1]["sent_MB"] == ""
