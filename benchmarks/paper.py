"""The Galaxy paper's experiment (issue 15): inference latency at world 2 over a shaped edge link,
one rank slowed, every method side by side.

    sudo python -m benchmarks.paper                                       # the default grid
    sudo python -m benchmarks.paper --links 100mbit --slow 4 --models bert --seqs 128 --layers 1 --repeats 2

Each rank runs in its own network namespace (benchmarks.netem; tbf shaping on this kernel, so the
link has a rate but no added delay). Rank 1 is made `--slow` times slower by
galaxy.planner.profile.slow_down (every torch call on it burns that many times its own CPU time;
waits for the peer are not multiplied); the measured per-block ratio is printed for each row.
Models: BERT-large width (hidden 1024, 16 heads, intermediate 4096) and LLaMA at GPT-2-large width
(hidden 1280, 20 heads, intermediate 5120), --layers deep, vocabulary 8000, batch 1, forward only.

Methods, timed interleaved in the same rounds (medians):
    local           the fast rank (0) alone
    tp, sp, galaxy  even splits (Megatron TP, sequence parallelism, Galaxy)
    galaxy_planned  Galaxy with the planner's splits (profiles taken on the slowed ranks)
    galaxy_overlap  the same with the overlap_tiles the planner's check picked of --tiles
    sp_planned      sequence parallelism with the planner's positions
    torch_tp        torch's parallelize_module, Colwise/Rowwise (even)
    torch_tp_sp     the same + SequenceParallel norms (even)
The planner also predicts local vs SP vs Galaxy (galaxy.planner.split.plan_layouts), then checks
its candidates in a measurement of its own (`trial`, galaxy.planner.check: interleaved rounds until
one is clearly fastest, at most --trial_repeats; the simplest of the close ones if none is) and runs
the one it picked: "planner" is that method (local, sp_planned or galaxy_overlap); both picks are
printed. Writes paper.csv and paper.svg to --out_dir (docs/results).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.common import RESULTS, Runner, bert_cfg, interleaved, median, svg_bars, table, write_results
from benchmarks.netem import EdgeNet, add_worker_args, rate_bits
from benchmarks.vs_torch_tp import TorchTP
from galaxy.planner.check import MIN_ROUNDS, check, from_rank0, leader
from galaxy.planner.profile import slow_down
from galaxy.planner.run import gather_profiles, plan_dims
from galaxy.planner.split import plan_layouts
from galaxy.runtime.launch import init_distributed

PORT = 29561
# An embedding lookup's time does not depend on the vocabulary, but initialising ~15 models per row
# does (BERT's 30522 x 1024 table is 2.5x a layer): a small vocabulary keeps the rows short.
VOCAB = 8000
MODELS = {"bert": dict(model="bert", hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=VOCAB),
          "llama": dict(model="llama", hidden_size=1280, num_attention_heads=20, intermediate_size=5120,
                        vocab_size=VOCAB)}
METHODS = ("local", "tp", "sp", "galaxy", "galaxy_planned", "galaxy_overlap", "sp_planned", "torch_tp",
           "torch_tp_sp")
PICKED = {"local": "local", "sp": "sp_planned", "galaxy": "galaxy_overlap"}  # plan_layouts' name -> method
PREDICTED = {"local": "local", "sp_planned": "sp", "galaxy_planned": "galaxy"}  # method -> its prediction
OURS_VS_TORCH = (("tp", "torch_tp"), ("galaxy", "torch_tp_sp"), ("planner", "torch_tp"), ("planner", "torch_tp_sp"))


def paper_cfg(sizes, layers, seq, **keys):
    """A model of `sizes` (MODELS), batch 1, dropout 0; keys: the layout's config keys."""
    return bert_cfg(keys.pop("parallel"), layers, seq, 1, **sizes, **keys)


def method_keys(candidates, tiles):
    """Config keys of every method of ours, from the planner's candidates (plan_layouts)."""
    planned = candidates["galaxy"][0]
    return {"local": {"parallel": "serial"}, "tp": {"parallel": "tp"}, "sp": {"parallel": "sp"},
            "galaxy": {"parallel": "galaxy"}, "galaxy_planned": planned,
            "galaxy_overlap": dict(planned, overlap_tiles=tiles), "sp_planned": candidates["sp"][0]}


def planner_pick(seconds):
    """The method for {layout (local, sp, galaxy): seconds} of the least (the prediction's pick)."""
    return PICKED[min(seconds, key=seconds.get)]


def speedups(medians, pick):
    """Ratios a row is judged by (> 1: the first named is faster), from {method: median seconds}
    and the method the planner picked; "best other" is the fastest method it did not pick."""
    best_other = min((m for m in medians if m != pick), key=medians.get)
    ours = dict(medians, planner=medians[pick])
    out = {"galaxy_overlap vs tp": medians["tp"] / medians["galaxy_overlap"],
           "planner vs tp": medians["tp"] / medians[pick],
           "planner vs best other": medians[best_other] / medians[pick]}
    out.update({f"{mine} vs {peer}": medians[peer] / ours[mine] for mine, peer in OURS_VS_TORCH})
    return out, best_other


def trial(rank, world, sizes, layers, seq, candidates, tiles, max_rounds, slowed):
    """The planner's check of its candidates (galaxy.planner.check; apart from the timed rounds the
    table reports): local, its SP split and its Galaxy split with each overlap_tiles of `tiles`,
    simplest first, raced in interleaved rounds until one is clearly fastest or `max_rounds` end.
    Predictions rest on a profile that other processes' load can skew, as on these shared cores, so
    the layout run is the one the check picks (as `python -m galaxy.planner --out` keeps).
    `slowed()`: the slow-down's context. Returns (the Verdict, the layout picked (local, sp, galaxy),
    the tiles galaxy_overlap runs: the pick's if a Galaxy one, else the leader among the Galaxy ones)."""
    galaxy = {f"galaxy x{k}": k for k in sorted(tiles)}
    keys = {"local": {"parallel": "serial"}, "sp": candidates["sp"][0]}
    keys.update({name: dict(candidates["galaxy"][0], overlap_tiles=k) for name, k in galaxy.items()})
    runners = {name: Runner(name, paper_cfg(sizes, layers, seq, **k), rank, world) for name, k in keys.items()}

    def time_round(names):
        times = interleaved([runners[name] for name in names], lambda r: r.infer(), 1, warmup=0)
        return {name: ts[0] for name, ts in times.items()}
    with slowed():
        verdict = check(list(keys), time_round, max_rounds=max_rounds, agree=from_rank0)
    tiled = verdict.best if verdict.best in galaxy else leader({name: verdict.times[name] for name in galaxy})
    return verdict, "galaxy" if verdict.best in galaxy else verdict.best, galaxy[tiled]


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


def measure_row(rank, world, mesh, sizes, seq, factor, opts):
    """One row on this rank: profile the blocks and the link with rank 1 slowed `factor` times,
    plan, check the plan (tiles, layout), then time every method (and count the bytes each sends)."""
    cfg = paper_cfg(sizes, opts.layers, seq, parallel="galaxy")
    def slowed():  # models are built at full speed, only the measurements are slowed
        return slow_down(rank, {1} if factor > 1 else set(), factor)

    with slowed():
        profiles, bandwidth = gather_profiles(cfg, world, batch=1)
    candidates = plan_layouts(profiles, bandwidth_Bps=bandwidth, **plan_dims(cfg, 1))
    verdict, layout, tiles = trial(rank, world, sizes, opts.layers, seq, candidates, opts.tiles, opts.trial_repeats,
                                   slowed)
    keys = method_keys(candidates, tiles)
    ours = [Runner(name, paper_cfg(sizes, opts.layers, seq, **k), rank, world) for name, k in keys.items()]
    peer = paper_cfg(sizes, opts.layers, seq, parallel="serial")
    peers = [TorchTP("torch_tp", peer, rank, mesh, False), TorchTP("torch_tp_sp", peer, rank, mesh, True)]
    step, sent = counting(ours)
    with slowed():
        times = interleaved(ours + peers, step, opts.repeats)
    every = [None] * world
    dist.all_gather_object(every, sent)
    predicted = {name: seconds for name, (_, seconds) in candidates.items()}
    return dict(seq=seq, slow=factor, times=times, profiles=[vars(p) for p in profiles], bandwidth=bandwidth,
                sent={r.name: max(s.get(r.name, 0.0) for s in every) for r in ours},  # the busier direction
                predicted=predicted, predicted_pick=planner_pick(predicted), pick=PICKED[layout], tiles=tiles,
                check={name: (median(ts), len(ts)) for name, ts in verdict.times.items()},
                check_rounds=verdict.rounds, decided=verdict.decided,
                splits={m: keys[m] for m in ("galaxy_planned", "sp_planned")})


def measure_rows(rank, world, models, opts):
    """Every (model, sequence, slow-down) row on this rank; `models`: name -> sizes (MODELS)."""
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for name, sizes in models.items():
        for seq in opts.seqs:
            for factor in opts.slow:
                start = time.perf_counter()
                row = measure_row(rank, world, mesh, sizes, seq, factor, opts)
                rows.append(dict(model=name, sizes=sizes, wall_s=time.perf_counter() - start, **row))
    return rows


def worker(args):
    """One rank inside its namespace."""
    torch.set_num_threads(1)  # both ranks share this machine's cores (the library no longer sets it)
    init_distributed(2, args.rank, f"tcp://{args.master_addr}:{PORT}", "gloo", timeout_s=1800)
    rows = measure_rows(args.rank, 2, {m: MODELS[m] for m in args.models}, args)
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_link(rate, args):
    with EdgeNet(rate, args.delay, prefix="gxpap") as net, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = [sys.executable, "-m", "benchmarks.paper", "--worker", "--master_addr", net.addr[0], "--out", str(out),
                "--layers", str(args.layers), "--repeats", str(args.repeats), "--models", *args.models,
                "--seqs", *map(str, args.seqs), "--slow", *map(str, args.slow), "--tiles", *map(str, args.tiles),
                "--trial_repeats", str(args.trial_repeats)]
        net.run_ranks(argv, args.timeout_s)
        return net.shaping, json.loads(out.read_text())


def slow_ratios(profiles):
    """Measured slow-down of rank 1 against rank 0 per block (attention, MLP, connective)."""
    keys = ("att_s_per_head", "mlp_s_per_column", "con_s_per_position")
    return [profiles[1][k] / profiles[0][k] for k in keys]


def block_line(row):
    """Per-layer block times of each rank (all heads, all columns, all positions) and the link."""
    seq, sizes, parts = row["seq"], row["sizes"], []
    for rank, p in enumerate(row["profiles"]):
        parts.append(f"rank {rank}: attention {p['att_s_per_head'] * sizes['num_attention_heads'] * 1e3:.1f} ms, "
                     f"MLP {p['mlp_s_per_column'] * sizes['intermediate_size'] * 1e3:.1f} ms, "
                     f"connective {p['con_s_per_position'] * seq * 1e3:.1f} ms")
    return f"    whole layer on one rank -- {'; '.join(parts)}; link {row['bandwidth'] / 1e6:.1f} MB/s"


def report_row(link, row):
    """Print one row and return its CSV rows, chart group name and {method: median seconds}."""
    medians = {m: median(ts) for m, ts in row["times"].items()}
    ratios = slow_ratios(row["profiles"])
    group = f"{link} {row['model']} s{row['seq']} x{row['slow']:g}"
    print(f"\n{link}, {row['model']}, seq {row['seq']}, rank 1 slowed {row['slow']:g}x -> measured "
          f"{ratios[0]:.2f}x attention, {ratios[1]:.2f}x MLP, {ratios[2]:.2f}x connective ({row['wall_s']:.0f} s)")
    print(block_line(row))
    how = "clearly fastest" if row["decided"] else "the simplest of the close ones"
    print("    planner predicts " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["predicted"].items())
          + f" (-> {row['predicted_pick']}); its check measured (median ms, rounds) "
          + ", ".join(f"{k} {s * 1e3:.0f} ({n})" for k, (s, n) in row["check"].items())
          + f" -> runs {row['pick']}, overlap_tiles {row['tiles']} ({how} after {row['check_rounds']} rounds)")
    print(f"    planned splits: {row['splits']}")
    lines, csv_rows = [], []
    for method, ts in row["times"].items():
        m, sent = medians[method], row["sent"].get(method)
        cells = dict(link=link, model=row["model"], seq=row["seq"], slow=f"{row['slow']:g}", method=method,
                     median_ms=round(m * 1e3, 1), min_ms=round(min(ts) * 1e3, 1), max_ms=round(max(ts) * 1e3, 1),
                     sent_MB=round(sent / 1e6, 2) if sent is not None else "",
                     predicted_ms=round(row["predicted"][PREDICTED[method]] * 1e3, 1) if method in PREDICTED else "",
                     speedup_vs_tp=round(medians["tp"] / m, 3), planner_pick=method == row["pick"],
                     measured_slowdown="/".join(f"{r:.2f}" for r in ratios), link_MBps=round(row["bandwidth"] / 1e6, 1))
        csv_rows.append(cells)
        lines.append([method + (" <- planner" if method == row["pick"] else ""), cells["median_ms"], cells["min_ms"],
                      cells["max_ms"], cells["predicted_ms"], cells["sent_MB"], f"{cells['speedup_vs_tp']:.2f}x"])
    print(table(lines, ["method", "median ms", "min ms", "max ms", "predicted ms", "MB sent", "vs tp"]))
    return csv_rows, group, medians


def check_args(p, args):
    """Bad flags fail before any namespace or process starts."""
    for rate in args.links:
        try:
            rate_bits(rate)
        except ValueError as e:
            p.error(f"--links: {e}")
    if any(f < 1 for f in args.slow):
        p.error(f"--slow {args.slow}: a slow-down factor is >= 1 (1 = homogeneous)")
    if any(s < 2 for s in args.seqs) or min(args.layers, args.repeats, *args.tiles) < 1:
        p.error("--seqs >= 2; --layers, --repeats and --tiles >= 1")
    if args.trial_repeats < MIN_ROUNDS:
        p.error(f"--trial_repeats {args.trial_repeats}: the planner's check needs at least {MIN_ROUNDS} rounds "
                f"to tell candidates apart")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=["100mbit", "500mbit", "1gbit"])
    p.add_argument("--delay", default="1ms", help="one-way delay (applied only where the kernel has netem)")
    p.add_argument("--slow", nargs="+", type=float, default=[2, 4], help="rank 1's slow-down factors (1: none)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bert", "llama"])
    p.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiles", nargs="+", type=int, default=[1, 2, 4, 8], help="overlap_tiles the planner measures")
    p.add_argument("--trial_repeats", type=int, default=12,
                   help=f"most rounds of the planner's check of its candidates (at least {MIN_ROUNDS}; it stops "
                        f"once one is clearly fastest)")
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--timeout_s", type=float, default=3600)
    add_worker_args(p)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    check_args(p, args)
    if args.worker:
        return worker(args)
    csv_rows, groups, values, judged = [], [], {}, []
    for link in args.links:
        shaping, rows = run_link(link, args)
        print(f"\nlink: {shaping}")
        for row in rows:
            cells, group, medians = report_row(link, row)
            csv_rows += cells
            groups.append(group)
            values.update({(group, m): s * 1e3 for m, s in medians.items()})
            ratios, best_other = speedups(medians, row["pick"])
            judged.append([group, row["predicted_pick"], row["pick"], best_other]
                          + [f"{r:.2f}x" for r in ratios.values()])
    print(f"\nratios (> 1: the first named is faster); {args.layers} layer(s), batch 1, {args.repeats} rounds")
    print(table(judged, ["row", "predicted pick", "planner runs", "best other"] + list(ratios)))
    title = f"inference latency, world 2, rank 1 slowed x times, {args.layers} layer(s), batch 1 (median ms)"
    write_results(args.out_dir, "paper", csv_rows, svg_bars(groups, list(METHODS), values, title))


if __name__ == "__main__":
    main()
