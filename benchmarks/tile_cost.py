"""What a tile costs (issue 23): why overlap_tiles pays over 100 Mbit/s and not over 1 Gbit/s.

    python -m benchmarks.tile_cost            # 2 ranks on loopback, about 15 seconds

Two gloo ranks on loopback (the link nearly free) run the fused operations of galaxy.comm.overlap
with BERT-large's attention shapes (hidden 1024, seq 128, 64 positions and 8 heads per rank):
q|k|v after the sequence's all-gather (gather_linear) and the output projection before its
reduce-scatter (linear_reduce_scatter), untiled and in 2, 4 and 8 tiles, at the host's speed and
as a 16 GFLOP/s device (galaxy.profiler.emulate). With the link free a tile can hide nothing, so
the growth per tile is its fixed cost. Then the cause measured alone: one reduce-scatter exchange
of a tile's rows, waited for alone, and 8 posted back to back (per exchange): do they pipeline?
"""
import argparse
import contextlib
import time

import torch
import torch.distributed as dist

from benchmarks.common import median, table
from galaxy.comm import collectives as C
from galaxy.comm import overlap
from galaxy.profiler.emulate import Throughput
from galaxy.runtime.launch import spawn

HIDDEN, SEQ, WORLD = 1024, 128, 2
TILES = (1, 2, 4, 8)


def _median_ms(call, group, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return median(times) * 1e3


def _fused(rank, group, gflops, repeats):
    """{(operation, tiles): median ms} at the host's speed (gflops None) or as an emulated device."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, SEQ // WORLD, HIDDEN, generator=g)
    qkv = [torch.randn(HIDDEN // WORLD, HIDDEN, generator=g) for _ in range(3)]
    biases = [torch.randn(HIDDEN // WORLD, generator=g) for _ in range(3)]
    out_proj, h = torch.randn(HIDDEN, HIDDEN // WORLD, generator=g), torch.randn(1, SEQ, HIDDEN // WORLD, generator=g)
    times = {}
    for tiles in TILES:
        geometry = overlap.SeqTiles([SEQ // WORLD] * WORLD, rank, tiles)
        calls = {"q|k|v after all-gather": lambda: overlap.gather_linear(x, qkv, biases, geometry, group),
                 "out proj before reduce-scatter": lambda: overlap.linear_reduce_scatter(h, out_proj, None, geometry,
                                                                                         group)}
        for name, call in calls.items():
            with torch.no_grad(), (Throughput(gflops) if gflops else contextlib.nullcontext()):
                times[(name, tiles)] = _median_ms(call, group, repeats)
    return times


def _exchanges(group, repeats):
    """{rows: (ms of one reduce-scatter waited alone, ms per exchange of 8 posted back to back)}."""
    times = {}
    for rows in (8, 16, 32):
        x = torch.randn(1, WORLD * rows, HIDDEN)
        one = _median_ms(lambda: C.start_reduce_scatter(x, 1, [rows] * WORLD, group).wait(), group, repeats)
        eight = _median_ms(lambda: [p.wait() for p in [C.start_reduce_scatter(x, 1, [rows] * WORLD, group)
                                                         for _ in range(8)]], group, repeats)
        times[rows] = (one, eight / 8)
    return times


def worker(rank, world, repeats):
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    return {"host": _fused(rank, group, None, repeats), "16 GFLOP/s": _fused(rank, group, 16.0, repeats),
            "exchanges": _exchanges(group, repeats)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    result = spawn(worker, WORLD, (args.repeats,), backend="gloo", timeout_s=300, limit_s=600)[0]
    rows = []
    for device in ("host", "16 GFLOP/s"):
        for name in ("q|k|v after all-gather", "out proj before reduce-scatter"):
            ms = [result[device][(name, tiles)] for tiles in TILES]
            per_tile = (ms[-1] - ms[0]) / (TILES[-1] - TILES[0])
            rows.append([device, name, *[f"{t:.2f}" for t in ms], f"{per_tile:.2f}"])
    print(f"rank 0, median ms of {args.repeats}; 2 ranks on loopback, BERT-large attention shapes, seq {SEQ}")
    print(table(rows, ["device", "operation", *[f"x{t}" for t in TILES], "ms per extra tile"]))
    print()
    print(table([[rows, f"{one:.2f}", f"{each:.2f}"] for rows, (one, each) in result["exchanges"].items()],
                ["rows per rank", "one reduce-scatter ms", "8 back to back, ms each"]))


if __name__ == "__main__":
    main()
