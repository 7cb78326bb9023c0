"""BERT-base inference latency at world 2 over emulated edge links (benchmarks.netem):
serial, TP, SP, Galaxy without and with tiled overlap, seq 512 and 1024, batch 1.

    sudo python -m benchmarks.edge_latency                        # 100mbit and 1gbit links, 12 layers
    sudo python -m benchmarks.edge_latency --links 1gbit --layers 4 --repeats 3

Each rank runs in its own network namespace; the two talk over the shaped veth link only.
All variants are timed interleaved in the same rounds (medians reported). Writes
edge_latency.csv and edge_latency.svg (a plain SVG bar chart) to --out_dir (docs/results).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, Runner, bert_cfg, interleaved, median, svg_bars, write_results
from benchmarks.netem import EdgeNet, add_worker_args

VARIANTS = {"serial": ("serial", {}), "tp": ("tp", {}), "sp": ("sp", {}), "galaxy": ("galaxy", {}),
            "galaxy+overlap": ("galaxy", {"overlap_tiles": 4})}
PORT = 29531


def worker(args):
    import torch
    """One rank inside its namespace: time every variant at every sequence length."""
    import torch.distributed as dist

    from galaxy.runtime.launch import init_distributed
    torch.set_num_threads(1)  # both ranks share this machine's cores (the library no longer sets it)
    init_distributed(2, args.rank, f"tcp://{args.master_addr}:{PORT}", "gloo", timeout_s=1800)
    results = {}
    for seq in args.seqs:
        runners = [Runner(name, bert_cfg(layout, args.layers, seq, 1, **extra), args.rank, 2)
                   for name, (layout, extra) in VARIANTS.items()]
        times = interleaved(runners, Runner.infer, args.repeats)
        results[seq] = times
        del runners
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


def run_link(rate, delay, args):
    with EdgeNet(rate, delay) as net, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        argv = [sys.executable, "-m", "benchmarks.edge_latency", "--worker", "--master_addr", net.addr[0],
                "--out", str(out), "--layers", str(args.layers), "--repeats", str(args.repeats),
                "--seqs", *map(str, args.seqs)]
        net.run_ranks(argv, args.timeout_s)
        return net.shaping, {int(k): v for k, v in json.loads(out.read_text()).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=["100mbit", "1gbit"])
    p.add_argument("--delay", default="1ms")
    p.add_argument("--seqs", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out_dir", default=RESULTS)
    p.add_argument("--timeout_s", type=float, default=3000)
    add_worker_args(p)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows, values, groups = [], {}, []
    for rate in args.links:
        shaping, results = run_link(rate, args.delay, args)
        print(f"link: {shaping}")
        for seq, times in results.items():
            group = f"{rate} seq{seq}"
            groups.append(group)
            base = median(times["serial"])
            for name, ts in times.items():
                m = median(ts)
                values[(group, name)] = m * 1e3
                rows.append(dict(link=rate, shaping=shaping, seq=seq, layout=name, median_ms=round(m * 1e3, 1),
                                 min_ms=round(min(ts) * 1e3, 1), max_ms=round(max(ts) * 1e3, 1),
                                 speedup_vs_serial=round(base / m, 3)))
                print(f"  seq {seq:5d} {name:15s} median {m * 1e3:8.0f} ms   {base / m:5.2f}x vs serial")
    title = f"BERT-base ({args.layers} layers) inference latency, world 2, batch 1"
    write_results(args.out_dir, "edge_latency", rows, svg_bars(groups, list(VARIANTS), values, title))


if __name__ == "__main__":
    main()
