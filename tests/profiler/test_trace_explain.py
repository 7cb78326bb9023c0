"""--trace_dir and --explain on real training steps: one spawn of 2 ranks runs one optimizer step
of every layout (tiny BERT, uneven splits, 2 micro-steps) through pretrain_galaxy's entry, of Galaxy
with side-tuning (each layer's output gathered for the side network; no backward through the frozen
backbone), and of a 2-stage pipeline with side-tuning (2 micro-batches per micro-step), whose stages send the side
state beside the hidden states (and only the side state's gradient back).

Bytes compared are those each rank contributes to each collective: its own slice for an
all-gather, its whole input tensor for a reduce-scatter or all-reduce (galaxy.comm.stats)."""
import argparse
import json
from collections import Counter

from galaxy.app import train
from galaxy.config.load import load_config
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.profiler.explain import bytes_by_label, record_step
from tests.helpers import run_ranks

LAYOUTS = {layout: {"parallel": layout} for layout in ("galaxy", "galaxy2", "sp", "tp", "dp")}
LAYOUTS["galaxy_side"] = {"parallel": "galaxy", "use_side": True, "side_reduction_factor": 4}
LAYOUTS["pp_side"] = {"parallel": "pp", "stage_num_hidden_layers_list": [2, 1], "num_microbatches": 2,
                      "use_side": True, "side_reduction_factor": 4}
TINY = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 3,
        "vocab_size": 100, "seq_length": 16, "batch_size": 4, "gradient_accumulation_steps": 2,
        "max_steps": 1, "data": "synthetic", "warmup_steps": 1,
        "tp_num_attention_heads_list": [3, 1], "tp_intermediate_size_list": [40, 24], "seq_scatter_list": [10, 6]}


def config(layout):
    return load_config("train_config/bert/full.json", {**TINY, **LAYOUTS[layout]})


def _train_every_layout(rank, world, trace_root):
    for layout in LAYOUTS:
        cfg = config(layout)
        args = argparse.Namespace(trace_dir=f"{trace_root}/{layout}", metrics_file=None, verbose=False,
                                  device_gflops=None, device_gflops_after=None)
        train.train(rank, world, cfg, build_plan(cfg, world), args)


def _load(trace_root, layout, rank):
    with open(f"{trace_root}/{layout}/trace_rank{rank}.json") as f:
        return json.load(f)


def _within(event, span):
    return span["ts"] <= event["ts"] and event["ts"] + event["dur"] <= span["ts"] + span["dur"]


def _collectives_per_layer_span(trace):
    """{("layer 1", "fwd"): Counter of collective names recorded inside that compute span}."""
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    comm = [e for e in events if e["cat"] == "comm" and e["args"]["phase"] != "grad"]
    spans = [e for e in events if e["name"].startswith("layer ")]
    out = {}
    for span in spans:
        layer, phase = span["name"].rsplit(" ", 1)
        out.setdefault((layer, phase), Counter()).update(e["name"] for e in comm if _within(e, span))
    return out


def test_trace_and_explain(tmp_path):
    run_ranks(_train_every_layout, 2, str(tmp_path), timeout_s=300)

    # Galaxy: per layer (each span holds 2 micro-steps' worth) two all-gathers and two reduce-scatters
    # forward, and their conjugates backward. Layer 0's input is replicated (embeddings), so it
    # instead has copy_to_all (all-reduce in backward) and split_scatter (all-gather in backward).
    for rank in range(2):
        trace = _load(tmp_path, "galaxy", rank)
        assert "traceEvents" in trace
        per_layer = _collectives_per_layer_span(trace)
        for layer in ("layer 1", "layer 2"):
            assert per_layer[layer, "fwd"] == Counter({"all_gather": 4, "reduce_scatter": 4})
            assert per_layer[layer, "bwd"] == Counter({"reduce_scatter(bwd)": 4, "all_gather(bwd)": 4})
        assert per_layer["layer 0", "fwd"] == Counter({"all_gather": 2, "reduce_scatter": 4})
        assert per_layer["layer 0", "bwd"] == Counter({"all_gather(bwd)": 6, "reduce_scatter(bwd)": 2,
                                                       "all_reduce(bwd)": 2})

    # --explain's per-rank byte totals equal what the traced step moved, in every layout.
    for layout in LAYOUTS:
        cfg = config(layout)
        plan = build_plan(cfg, 2)
        for rank in range(2):
            expected = bytes_by_label(record_step(plan, cfg, rank, build_model)[0])
            traced = _load(tmp_path, layout, rank)["otherData"]["comm_bytes"]["1"]
            assert traced == expected, (layout, rank)
            assert sum(e["args"]["bytes"] for e in _load(tmp_path, layout, rank)["traceEvents"]
                       if e.get("cat") == "comm") == sum(expected.values())

    # the pipeline's sends: stage 0 hands on hidden (32) and side (32 / 4) states of every micro-batch,
    # stage 1 returns only the side state's gradient (the frozen backbone's needs none)
    micro_batches, elements = 2 * 2, 2 * TINY["seq_length"] * 4  # per step; [2 samples, 16 positions, fp32 bytes]
    assert _load(tmp_path, "pp_side", 0)["otherData"]["comm_bytes"]["1"] == {"send": micro_batches * elements * (32 + 8)}
    assert _load(tmp_path, "pp_side", 1)["otherData"]["comm_bytes"]["1"] == {"send(bwd)": micro_batches * elements * 8}
