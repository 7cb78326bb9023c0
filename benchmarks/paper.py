"""The Galaxy paper's experiment (issues 15, 23): forward latency of edge devices, emulated by
throughput, over shaped links, every method side by side and beside the physical limit.

    sudo python -m benchmarks.paper                   # the full grid (GRID, 27 minutes on a quiet machine)
    sudo python -m benchmarks.paper --links 1gbit --devices 16,4 --models bert --seqs 128 --repeats 2

Every rank runs in its own network namespace, linked to a switch by its own link of the given rate
(benchmarks.netem: tbf on this kernel, so a rate and no added delay), and computes as a device of
the stated fp32 throughput (galaxy.profiler.emulate: each torch call with arithmetic takes its FLOPs
/ throughput, sleeping what the host did not need; copies, sends and waits keep the host's speed).
Rank 0 is the fastest device. Models: BERT-large width (hidden 1024, 16 heads, intermediate 4096)
and LLaMA at GPT-2-large width (hidden 1280, 20 heads, intermediate 5120, gated MLP), --layers deep,
vocabulary 8000, batch 1, forward only.

Methods, timed interleaved in the same rounds (medians):
    local           the fastest device (rank 0) alone
    tp, sp, galaxy  even splits (Megatron TP, sequence parallelism, Galaxy)
    galaxy_planned  Galaxy with the planner's splits (profiles taken on the emulated devices)
    galaxy_overlap  the same with the overlap_tiles the planner's check picked of --tiles
    sp_planned      sequence parallelism with the planner's positions
    torch_tp        torch's parallelize_module, Colwise/Rowwise (even)
    torch_tp_sp     the same + SequenceParallel norms (even)
The planner predicts local, TP even, SP, Galaxy even and Galaxy planned (galaxy.planner.split.
plan_layouts), then races them in a measurement of its own (galaxy.planner.check: interleaved rounds
until one is clearly fastest, at most --trial_repeats; the leader by medians of the close ones if none is); the
method it picked is marked planner_pick. It is judged against the best other method that runs a
different model: one with the very same plan and tiles (SP even beside SP planned at [64, 64]) is the pick.

Beside every figure: ideal_ms, the row's whole forward FLOPs over the devices' summed throughput
(free links), and limit_ms, max(ideal_ms, the method's bytes over the measured link rate) (perfect
overlap). A row's regime is "compute" when one layer's compute on the fastest device takes at least
3x the link time of TP's bytes for that layer, else "link". measured_gflops is what each rank's
profile showed for one layer (FLOPs / time; off when not within 10% of its target).
Writes paper.csv and paper.svg to --out_dir (docs/results).
"""
import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.common import (RESULTS, RING_FACTOR, Runner, bert_cfg, interleaved, median, svg_bars, table,
                               write_results)
from benchmarks.netem import EdgeNet, add_worker_args, rate_bits
from benchmarks.vs_torch_tp import TorchTP
from galaxy.comm.overlap import parse_tiles, tiles_name
from galaxy.plan import build_plan
from galaxy.planner.check import MIN_ROUNDS, check, from_rank0, leader
from galaxy.planner.profile import block_flops, profile_gflops
from galaxy.planner.run import gather_profiles, plan_dims
from galaxy.planner.split import RankProfile, plan_layouts, race
from galaxy.profiler.emulate import Throughput, parse_gflops
from galaxy.runtime.launch import init_distributed

PORT = 29561
# An embedding lookup's time does not depend on the vocabulary, but initialising ~12 models per row
# does (BERT's 30522 x 1024 table is 2.5x a layer): a small vocabulary keeps the rows short.
VOCAB = 8000
MODELS = {"bert": dict(model="bert", hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=VOCAB),
          "llama": dict(model="llama", hidden_size=1280, num_attention_heads=20, intermediate_size=5120,
                        vocab_size=VOCAB),
          "tiny": dict(model="bert", hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=100)}
# ("tiny": for the fast test of the whole path, tests/benchmarks/test_paper.py)
OURS = ("local", "tp", "sp", "galaxy", "galaxy_planned", "galaxy_overlap", "sp_planned")
METHODS = OURS + ("torch_tp", "torch_tp_sp")
RACED = {"local": "local", "tp": "tp", "sp": "sp_planned", "galaxy even": "galaxy"}  # check's name -> method
OFF = 0.10  # an emulated device whose measured throughput is further than this from its target is "off"
COMPUTE_BOUND = 3.0  # regime "compute": the fastest device's layer compute >= this x TP's link time per layer

# The full grid: 27 minutes on a quiet 2-core machine (docs/results/paper.md has the time per row).
# 16 GFLOP/s devices are compute-dominated over 1 Gbit/s and 500 Mbit/s and link-bound over 100 Mbit/s;
# 6 GFLOP/s ones are compute-dominated over 100 Mbit/s too (docs/emulation.md: the device classes). The
# ranks of a row together stay below ~40 GFLOP/s: these 2 host cores do ~30 GFLOP/s each in a matmul.
GRID = [
    dict(links=["100mbit", "1gbit"], devices=["16,16", "16,8", "16,4", "8,8,8,8", "16,8,4,4"], models=["bert"],
         seqs=[128]),
    dict(links=["500mbit"], devices=["16,4"], models=["bert"], seqs=[128]),
    dict(links=["100mbit"], devices=["6,3"], models=["bert"], seqs=[128]),
    dict(links=["1gbit"], devices=["16,4"], models=["llama"], seqs=[128]),
    dict(links=["1gbit"], devices=["16,8"], models=["bert"], seqs=[512]),
]


def paper_cfg(sizes, layers, seq, **keys):
    """A model of `sizes` (MODELS), batch 1, dropout 0; keys: the layout's config keys."""
    return bert_cfg(keys.pop("parallel"), layers, seq, 1, **sizes, **keys)


def method_keys(candidates, tiles):
    """Config keys of every method of ours, from the planner's candidates (plan_layouts)."""
    planned = candidates["galaxy"][0]
    return {"local": {"parallel": "serial"}, "tp": {"parallel": "tp"}, "sp": {"parallel": "sp"},
            "galaxy": {"parallel": "galaxy"}, "galaxy_planned": planned,
            "galaxy_overlap": dict(planned, overlap_tiles=tiles), "sp_planned": candidates["sp"][0]}


def twins(keys, pick, sizes, layers, seq, world):
    """The methods of ours that run the very model the pick runs (the same plan and tiles, e.g. SP
    even beside SP planned with positions [64, 64]): the pick is not judged against itself."""
    def layout(name):
        cfg = paper_cfg(sizes, layers, seq, **keys[name])
        return build_plan(cfg, world), cfg["overlap_tiles"]
    if pick == "local":  # the fastest device alone: no other method runs on one rank
        return []
    mine = layout(pick)
    return [m for m in keys if m not in (pick, "local") and layout(m) == mine]


def tiles_of(name):
    """The overlap_tiles of a planned Galaxy candidate of the check ("galaxy x4" -> 4, "galaxy x[1, 3]")."""
    return json.loads(name.rsplit("x", 1)[1])


def picked_method(best, tiles):
    """The table's method of the check's pick (a race name of galaxy.planner.split.race)."""
    if best in RACED:
        return RACED[best]
    return "galaxy_overlap" if tiles_of(best) == tiles else "galaxy_planned"


def overlap_tiles(verdict):
    """The tiles galaxy_overlap runs: the pick's if it is a planned Galaxy one, else the leader of those."""
    tiled = [name for name in verdict.times if name.startswith("galaxy x")]
    best = verdict.best if verdict.best in tiled else leader({name: verdict.times[name] for name in tiled})
    return tiles_of(best)


class Methods:
    """Every method's runner on this rank, built once per row; the check's candidates run the same
    models as the table's methods (a planned Galaxy split per tiling only for the check)."""

    def __init__(self, rank, world, mesh, sizes, layers, seq, candidates, tiles):
        self.cfg = lambda **keys: paper_cfg(sizes, layers, seq, **keys)
        self.rank, self.world = rank, world
        self.raced = race(candidates, tiles)
        self.by_race = {}
        for name, keys in self.raced.items():
            method = RACED[name] if name in RACED else f"galaxy_overlap x{tiles_of(name)}"
            self.by_race[name] = Runner(method, self.cfg(**keys), rank, world)
        self.candidates, self.mesh = candidates, mesh

    def time_round(self, names):
        """galaxy.planner.check's time_round: one forward of each of `names` (race names)."""
        times = interleaved([self.by_race[name] for name in names], lambda r: r.infer(), 1, warmup=0)
        return {name: times[self.by_race[name].name][0] for name in names}

    def table(self, tiles):
        """The table's runners (METHODS order), galaxy_overlap with `tiles`: ours, then torch's."""
        keys = method_keys(self.candidates, tiles)
        built = {RACED[name]: runner for name, runner in self.by_race.items() if name in RACED}
        built.update(galaxy_planned=self.by_race.get("galaxy x1"), galaxy_overlap=self.by_race[f"galaxy x{tiles}"])
        ours = [_named(built.get(m) or Runner(m, self.cfg(**keys[m]), self.rank, self.world), m) for m in OURS]
        peer = self.cfg(parallel="serial")
        return ours, [TorchTP("torch_tp", peer, self.rank, self.mesh, False),
                      TorchTP("torch_tp_sp", peer, self.rank, self.mesh, True)]


def _named(runner, name):
    """`runner` under `name` (a copy sharing its model when it was built under another)."""
    if runner.name == name:
        return runner
    runner = copy.copy(runner)
    runner.name = name
    return runner


def counting(ours):
    """A step for `interleaved` (forward) that counts the bytes each of `ours` sends in its first,
    warm-up, forward; returns (step, {name: bytes}), filled as the rounds run."""
    sent = {}

    def step(runner):
        if runner in ours and runner.active and runner.name not in sent:
            sent[runner.name] = runner.activation_bytes(runner.infer)
        else:
            runner.infer()
    return step, sent


def torch_sent(cfg, world, sequence_parallel):
    """Bytes a rank sends in torch's TP forward (ring volumes): per layer two all-reduces of the
    [1, T, H] activation (TP) or two all-gathers + two reduce-scatters, the same volume (TP + SP),
    which then gathers the output along the sequence."""
    activation = cfg["seq_length"] * cfg["hidden_size"] * 4
    sent = cfg["num_hidden_layers"] * 2 * RING_FACTOR["all_reduce"](world) * activation
    return sent + (RING_FACTOR["all_gather"](world) * activation / world if sequence_parallel else 0)


def measure_row(rank, world, mesh, spec, opts):
    """One row on this rank: profile the blocks and the link on the emulated devices, plan, check
    the planner's candidates, then time every method (and count the bytes each sends)."""
    sizes, seq, devices = MODELS[spec["model"]], spec["seq"], spec["devices"]
    device = Throughput(devices[rank])  # entered for the measurements only: models build at the host's speed
    cfg = paper_cfg(sizes, opts.layers, seq, parallel="galaxy")
    with device:
        profiles, bandwidth = gather_profiles(cfg, world, batch=1)
    candidates = plan_layouts(profiles, bandwidth_Bps=bandwidth, **plan_dims(cfg, 1))
    methods = Methods(rank, world, mesh, sizes, opts.layers, seq, candidates, opts.tiles)
    with device:
        verdict = check(list(methods.raced), methods.time_round, max_rounds=opts.trial_repeats, agree=from_rank0)
    tiles = overlap_tiles(verdict)
    ours, peers = methods.table(tiles)
    step, sent = counting(ours)
    with device:
        times = interleaved(ours + peers, step, opts.repeats)
    every = [None] * world
    dist.all_gather_object(every, sent)
    sent = {r.name: max(s.get(r.name, 0.0) for s in every) for r in ours}  # the busiest rank's
    sent.update({p.name: torch_sent(cfg, world, p.sp) for p in peers})
    pick = picked_method(verdict.best, tiles)
    return dict(spec, times=times, profiles=[vars(p) for p in profiles], bandwidth=bandwidth, flops=block_flops(cfg),
                sent=sent, predicted={name: seconds for name, (_, seconds) in candidates.items()},
                pick=pick, tiles=tiles,
                twins=twins(method_keys(candidates, tiles), pick, sizes, opts.layers, seq, world),
                check={name: (median(ts), len(ts)) for name, ts in verdict.times.items()},
                check_rounds=verdict.rounds, decided=verdict.decided,
                splits={m: candidates[k][0] for m, k in (("galaxy_planned", "galaxy"), ("sp_planned", "sp"))})


def worker(args):
    """One rank inside its namespace: every row of `--rows` (one link, one world)."""
    torch.set_num_threads(1)  # the ranks share this machine's cores (the library never sets it)
    specs = json.loads(args.rows)
    world = len(specs[0]["devices"])
    init_distributed(world, args.rank, f"tcp://{args.master_addr}:{PORT}", "gloo", timeout_s=1800)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for spec in specs:
        start = time.perf_counter()
        row = measure_row(args.rank, world, mesh, spec, args)
        rows.append(dict(row, wall_s=time.perf_counter() - start))
        if args.rank == 0:  # progress: the report comes when the link's rows are done
            print(f"{spec['devices']} {spec['model']} seq {spec['seq']}: {rows[-1]['wall_s']:.0f} s", flush=True)
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_group(link, specs, args):
    """Rows of one link and world, in namespaces: (the shaping used, the rows measured)."""
    world = len(specs[0]["devices"])
    with EdgeNet(link, args.delay, prefix="gxpap", world=world) as net, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [sys.executable, "-m", "benchmarks.paper", "--worker", "--master_addr", net.addr[0], "--out", str(out),
                "--rows", json.dumps(specs), "--layers", str(args.layers), "--repeats", str(args.repeats),
                "--tiles", *map(tiles_name, args.tiles), "--trial_repeats", str(args.trial_repeats)]
        net.run_ranks(argv, args.timeout_s)
        return net.shaping, json.loads(out.read_text())


# ---- the report -----------------------------------------------------------------------------

def layer_flops(flops):
    return flops["attention"] + flops["mlp"] + 2 * flops["connective"]


def row_figures(row):
    """What a row is judged by: ideal seconds, the regime and its ratio, each rank's measured GFLOP/s
    per block, whether any rank is off its target."""
    sizes, devices, world = MODELS[row["model"]], row["devices"], len(row["devices"])
    cfg = dict(sizes, seq_length=row["seq"])
    per_layer = layer_flops(row["flops"])
    ideal = row["layers"] * per_layer / (sum(devices) * 1e9)
    tp_link = 2 * RING_FACTOR["all_reduce"](world) * row["seq"] * sizes["hidden_size"] * 4 / row["bandwidth"]
    ratio = per_layer / (max(devices) * 1e9) / tp_link
    measured = [profile_gflops(RankProfile(**p), row["flops"], cfg) for p in row["profiles"]]
    off = [abs(m["layer"] / g - 1) > OFF for m, g in zip(measured, devices, strict=True)]
    return dict(ideal=ideal, ratio=ratio, regime="compute" if ratio >= COMPUTE_BOUND else "link",
                measured=measured, off=off)


def gflops_text(values):
    return "/".join(f"{v:g}" for v in values)


def csv_rows(link, row, medians, fig):
    measured = gflops_text(float(f"{m['layer']:.3g}") for m in fig["measured"]) + (" (off)" if any(fig["off"]) else "")
    out = []
    for method, ts in row["times"].items():
        m, sent = medians[method], row["sent"][method]
        out.append(dict(link=link, world=len(row["devices"]), devices_gflops=gflops_text(row["devices"]),
                        model=row["model"], layers=row["layers"], seq=row["seq"], method=method,
                        median_ms=round(m * 1e3, 1), min_ms=round(min(ts) * 1e3, 1), max_ms=round(max(ts) * 1e3, 1),
                        ideal_ms=round(fig["ideal"] * 1e3, 1),
                        limit_ms=round(max(fig["ideal"], sent / row["bandwidth"]) * 1e3, 1),
                        sent_MB=round(sent / 1e6, 2), speedup_vs_tp=round(medians["tp"] / m, 3),
                        speedup_vs_local=round(medians["local"] / m, 3), planner_pick=method == row["pick"],
                        measured_gflops=measured, regime=fig["regime"]))
    return out


def targets(row, medians, fig):
    """The issue's targets that apply to this row: [(target, ratio, goal)]."""
    devices, world = row["devices"], len(row["devices"])
    apart = max(devices) / min(devices)
    pick = medians[row["pick"]]
    limit = max(fig["ideal"], row["sent"][row["pick"]] / row["bandwidth"])
    others = [m for k, m in medians.items() if k != row["pick"] and k not in row.get("twins", ())]
    out = [("pick vs best other", min(others) / pick, 1.0)]
    if row["pick"].startswith("galaxy"):
        out.append(("limit / pick", limit / pick, 1 / 1.25))
    if fig["regime"] == "compute" and world == 2:
        out.append(("galaxy_overlap vs tp", medians["tp"] / medians["galaxy_overlap"], 0.9 * (apart + 1) / 2))
    if fig["regime"] == "compute" and world == 4 and apart == 1:
        out.append(("galaxy_overlap vs local", medians["local"] / medians["galaxy_overlap"], 2.5))
    if apart > 1:
        out.append(("galaxy_overlap vs torch_tp_sp", medians["torch_tp_sp"] / medians["galaxy_overlap"], 1.3))
    return out


def hidden_share(row, medians):
    """The share of Galaxy's link time the overlap hid: (planned - overlap) / its bytes' link time."""
    link_s = row["sent"]["galaxy_planned"] / row["bandwidth"]
    return (medians["galaxy_planned"] - medians["galaxy_overlap"]) / link_s if link_s else float("nan")


def report_row(link, row):
    """Print one row; return its CSV rows, chart group, {method: median seconds} and target lines."""
    medians = {m: median(ts) for m, ts in row["times"].items()}
    fig = row_figures(row)
    devices = gflops_text(row["devices"])
    group = f"{link} {devices} {row['model']} s{row['seq']}"
    print(f"\n{link}, devices {devices} GFLOP/s, {row['model']} x{row['layers']} layers, seq {row['seq']} "
          f"({row['wall_s']:.0f} s): link {row['bandwidth'] / 1e6:.1f} MB/s, regime {fig['regime']} (fastest "
          f"device's layer compute = {fig['ratio']:.1f}x TP's link time per layer)")
    for rank, (m, target, off) in enumerate(zip(fig["measured"], row["devices"], fig["off"], strict=True)):
        print(f"    rank {rank}: target {target:g} GFLOP/s, measured attention {m['attention']:.3g}, MLP {m['mlp']:.3g}, "
              f"connective {m['connective']:.3g} (element-wise, not held to it), layer {m['layer']:.3g}"
              + ("  OFF (> 10% from target)" if off else ""))
    how = "clearly fastest" if row["decided"] else "the leader by medians of the close ones"
    print("    planner predicts " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["predicted"].items())
          + "; its check measured (median ms, rounds) " + ", ".join(f"{k} {s * 1e3:.0f} ({n})" for k, (s, n)
                                                                      in row["check"].items())
          + f" -> {row['pick']}, overlap_tiles {row['tiles']} ({how} after {row['check_rounds']} rounds)")
    print(f"    planned splits: {row['splits']}; overlap hid {hidden_share(row, medians):.0%} of Galaxy's link time")
    cells = csv_rows(link, row, medians, fig)
    print(table([[c["method"] + (" <- planner" if c["planner_pick"] else ""), c["median_ms"], c["min_ms"], c["max_ms"],
                  c["limit_ms"], f"{c['median_ms'] / c['limit_ms']:.2f}", c["sent_MB"], f"{c['speedup_vs_tp']:.2f}x",
                  f"{c['speedup_vs_local']:.2f}x"] for c in cells],
                ["method", "median ms", "min ms", "max ms", "limit ms", "/ limit", "MB sent", "vs tp", "vs local"]))
    lines = [[group, name, f"{ratio:.2f}", f">= {goal:.2f}", "met" if ratio >= goal else "MISSED"]
             for name, ratio, goal in targets(row, medians, fig)]
    return cells, group, medians, fig, lines


# ---- the command line -------------------------------------------------------------------------

def row_specs(args):
    """[(link, [row spec])] grouped by link and world, from the flags or, without them, GRID."""
    blocks = GRID if args.links is None and args.devices is None and args.models is None and args.seqs is None else [
        dict(links=args.links or ["1gbit"], devices=args.devices or ["16,4"], models=args.models or ["bert"],
             seqs=args.seqs or [128])]
    groups = {}
    for block in blocks:
        for link, devices, model, seq in itertools.product(block["links"], block["devices"], block["models"],
                                                           block["seqs"]):
            gflops = parse_gflops(devices)
            spec = dict(devices=gflops, model=model, seq=seq, layers=args.layers)
            groups.setdefault((link, len(gflops)), []).append(spec)
    return [(link, specs) for (link, _), specs in groups.items()]


def check_args(p, args):
    """Bad flags fail before any namespace or process starts."""
    for rate in args.links or []:
        try:
            rate_bits(rate)
        except ValueError as e:
            p.error(f"--links: {e}")
    for devices in args.devices or []:
        try:
            gflops = parse_gflops(devices)
        except ValueError as e:
            p.error(f"--devices: {e}")
        if len(gflops) < 2 or min(gflops) <= 0 or gflops[0] != max(gflops):
            p.error(f"--devices {devices}: two or more throughputs above 0 (GFLOP/s), the first the fastest "
                    f"(rank 0 runs 'local')")
    if any(s < 4 for s in args.seqs or []) or min(args.layers, args.repeats) < 1:
        p.error("--seqs >= 4; --layers and --repeats >= 1")
    if args.trial_repeats < MIN_ROUNDS:
        p.error(f"--trial_repeats {args.trial_repeats}: the planner's check needs at least {MIN_ROUNDS} rounds "
                f"to tell candidates apart")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=None, help="link rates (tc units); with --devices/--models/--seqs "
                   "the rows are their product (defaults 1gbit, 16,4, bert, 128), without any of them GRID")
    p.add_argument("--devices", nargs="+", default=None, help="device sets, GFLOP/s per rank, fastest first: 16,4 8,8,8,8")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--seqs", nargs="+", type=int, default=None)
    p.add_argument("--delay", default="1ms", help="one-way delay (applied only where the kernel has netem)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiles", nargs="+", type=parse_tiles, default=[1, 2, 4, [1, 7]],
                   help="overlap_tiles the planner measures, counts or tile sizes (2 4 1,3); [1, 7] won at seq 512")
    p.add_argument("--trial_repeats", type=int, default=5,
                   help=f"most rounds of the planner's check of its candidates (at least {MIN_ROUNDS}; it stops "
                        f"once one is clearly fastest)")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--timeout_s", type=float, default=3600)
    add_worker_args(p)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    check_args(p, args)
    csv, groups, values, judged = [], [], {}, []
    for link, specs in row_specs(args):
        shaping, rows = run_group(link, specs, args)
        print(f"\nlink: {shaping}, world {len(specs[0]['devices'])}")
        for row in rows:
            cells, group, medians, fig, lines = report_row(link, row)
            csv += cells
            groups.append(group)
            values.update({(group, m): s * 1e3 for m, s in medians.items()})
            values[group, "ideal"] = fig["ideal"] * 1e3
            judged += lines
    print(f"\ntargets (issue 23); {args.layers} layers, batch 1, {args.repeats} rounds")
    print(table(judged, ["row", "target", "ratio", "goal", ""]))
    title = f"forward latency, emulated edge devices over shaped links, {args.layers} layers, batch 1 (median ms)"
    write_results(args.out_dir, "paper", csv, svg_bars(groups, ["ideal", *METHODS], values, title))


if __name__ == "__main__":
    main()
