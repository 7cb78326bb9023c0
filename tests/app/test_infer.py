"""Inference (galaxy/app/infer.py, infer_galaxy.py): what the inference path returns in a layout equals
the serial model's output at world 2 and 3 with uneven splits; the script runs as a user would and
prints its percentiles; bad input stops before any process starts."""
import json
import re

import pytest
import torch

from galaxy.app import infer
from galaxy.app.infer import eval_model, forward_fn, serve
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from tests.helpers import rel_err, run_ranks, run_script
from tests.models.bart.test_bart_layouts import MODEL as BART, SPLITS as BART_SPLITS
from tests.models.test_bert_layouts import MODEL as BERT, SPLITS as BERT_SPLITS
from tests.models.llama.common import MODEL as LLAMA
from tests.models.llama.test_llama_layouts import SPLITS as LLAMA_SPLITS

# dropout stays on in the configs: the inference path must switch it off to match serial in eval
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
MODELS = {"bert": (BERT, BERT_SPLITS), "llama": (LLAMA, LLAMA_SPLITS), "bart": (BART, BART_SPLITS)}
CASES = [("bert", "galaxy"), ("bert", "tp"), ("llama", "galaxy"), ("bart", "galaxy"), ("bert", "pp"), ("llama", "pp")]
# 3 layers: uneven stages at world 2, one layer a stage at world 3
STAGES = {2: [2, 1], 3: [1, 1, 1]}
TILED = {"bert": [1, 2], "llama": 3, "bart": 2}


def config(model, layout, world, **extra):
    shape, splits = MODELS[model]
    if layout == "serial":
        split = {}
    else:
        split = dict(stage_num_hidden_layers_list=STAGES[world]) if layout == "pp" else splits[world]
    return load_config(None, {**shape, **DROPOUT, **split, "num_hidden_layers": 3, "model": model,
                              "parallel": layout, **extra})


def batch(cfg):
    """Two sequences, the second with padding at its end (its mask reaches every block)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg["vocab_size"], (2, cfg["seq_length"]), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return ids, mask


def serial_output(model, save_dir=None, **extra):
    """The serial model's output in eval mode (its weights written to save_dir when given)."""
    cfg = config(model, "serial", 1, **extra)
    net = build_model(cfg).eval()
    if save_dir:
        net.save_hf(save_dir)
    ids, mask = batch(cfg)
    with torch.no_grad():
        return net.model.encode(ids, mask) if model == "bart" else net(ids, mask)


def _infer_cases(rank, world, checkpoint):
    """{case: what the inference path returned on this rank}; a pipeline's output is on its last stage."""
    out = {}
    for model, layout in CASES:
        out[model, layout] = _infer_once(config(model, layout, world), world, rank)
    # weights from a checkpoint, not from the seed: built with another seed, then loaded
    out["bert", "galaxy, loaded"] = _infer_once(config("bert", "galaxy", world, load_checkpoint=checkpoint), world, rank)
    for model, tiles in TILED.items():  # the tiled collectives fused into the linears, in eval
        cfg = config(model, "galaxy", world, overlap_tiles=tiles)
        out[model, f"galaxy, tiles {tiles}"] = _infer_once(cfg, world, rank)
    return out


def _infer_once(cfg, world, rank):
    model, ctx = eval_model(cfg, build_plan(cfg, world), rank)  # the path infer() takes to serve()
    return [o for o, _ in serve(forward_fn(model, cfg["model"]), [batch(cfg)], ctx)][0]


@pytest.mark.parametrize("world", [2, 3])
def test_inference_matches_serial(world, tmp_path):
    want = {(model, layout): serial_output(model) for model, layout in CASES}
    want["bert", "galaxy, loaded"] = serial_output("bert", tmp_path, seed=7)
    want.update({(model, f"galaxy, tiles {tiles}"): serial_output(model) for model, tiles in TILED.items()})
    for rank, outputs in enumerate(run_ranks(_infer_cases, world, str(tmp_path), timeout_s=240)):
        assert outputs.keys() == want.keys()
        last_stage = rank == world - 1
        for case, got in outputs.items():
            if case[1] == "pp" and not last_stage:
                assert got is None, (case, rank)
                continue
            assert got.shape == want[case].shape, (case, rank)
            assert rel_err(got, want[case]) < 1e-5, (case, rank, rel_err(got, want[case]))


TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--seq_length", "32", "--timeout_s", "60"]


def test_script_prints_percentiles_and_writes_metrics_and_traces(tmp_path):
    texts, metrics = tmp_path / "texts.txt", tmp_path / "latency.jsonl"
    texts.write_text("The tuple is an immutable sequence.\nA list can change.\n")
    out = run_script("infer_galaxy.py", "--config_file", "train_config/bert/galaxy/full.json", "--world", "2",
                     *TINY, "--requests", "3", "--warmup", "1", "--texts", str(texts), "--metrics_file", str(metrics),
                     "--overlap_tiles", "2", "--trace_dir", str(tmp_path / "trace"))
    assert out.returncode == 0, out.stderr[-3000:]
    line = re.search(r"^latency over 3 requests \(batch 1, 32 tokens\): p50 ([\d.]+) ms, p90 ([\d.]+) ms, "
                     r"p99 ([\d.]+) ms, mean ([\d.]+) ms; throughput ([\d.]+) sequences/s", out.stdout, re.M)
    assert line, out.stdout
    p50, p90, p99, mean, _ = map(float, line.groups())
    assert 0 < p50 <= p90 <= p99
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert [r["request"] for r in rows] == [0, 1, 2]
    assert abs(sum(r["latency_s"] for r in rows) / 3 * 1e3 - mean) < 0.01
    for rank in range(2):
        trace = json.loads((tmp_path / "trace" / f"trace_rank{rank}.json").read_text())
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert [e["name"] for e in spans if e["cat"] == "step"] == ["step 1", "step 2", "step 3", "step 4"]
        per_request = trace["otherData"]["comm_bytes"]
        assert list(per_request) == ["1", "2", "3", "4"] and len({json.dumps(b) for b in per_request.values()}) == 1
        layer1 = next(e for e in spans if e["name"] == "layer 1 fwd" and e["ts"] > spans[0]["ts"])
        end = layer1["ts"] + layer1["dur"]
        inside = [e["name"] for e in spans if e["cat"] == "comm" and layer1["ts"] <= e["ts"] <= end]
        assert sorted(inside) == ["all_gather"] * 4 + ["reduce_scatter"] * 4  # 2 tiles x (ATT's, MLP's)


@pytest.mark.parametrize("argv, message", [
    (["--requests", "0"], "argument --requests: 0 must be at least 1"),
    (["--warmup", "-1"], "argument --warmup: -1 must not be negative"),
    (["--texts", "no/such/file.txt"], "no/such/file.txt is not a file"),
    (["--texts", "blank.txt"], "blank.txt has no text"),
    (["--config_file", "train_config/bert/pp/full.json", "--virtual_stages", "2", "--pipeline_schedule",
      "interleaved-1f1b", "--stage_num_hidden_layers_list", "[1,1,1,1]"], "virtual_stages 2: inference"),
])
def test_bad_input_stops_before_processes_start(argv, message, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    argv = [str(tmp_path / a) if a == "blank.txt" else a for a in argv]
    out = run_script("infer_galaxy.py", "--world", "2", *argv, timeout=60)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "[rank" not in out.stdout + out.stderr


def test_help_says_what_the_metrics_file_gets(capsys):
    with pytest.raises(SystemExit):
        infer.main("inference", "train_config/bert/galaxy/full.json", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--metrics_file METRICS_FILE append one JSON line per timed request (request, latency_s)" in text, text
