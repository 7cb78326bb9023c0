"""Re-planning live: forward latency per request before a rank slows down, while it is slowed, and
after the ranks re-planned (galaxy.planner.replan), against a model planned for the slowed rank
from the start (the planner's profile and split, galaxy.planner.run), BERT-base widths, Galaxy
layout, gloo.

    python -m benchmarks.replan                         # devices of 16 GFLOP/s; rank 1 throttles to 8
    python -m benchmarks.replan --devices 8,8,8,8 --slowed 8,4,8,8 --layers 4

Each rank is an edge device emulated by throughput (galaxy.profiler.emulate, docs/emulation.md):
--devices GFLOP/s per rank, --slowed after --before requests (a thermal throttle). Each round
serves one request on the live model and, once slowed, one on the model planned from the start for
the slowed devices, so load from other processes hits both alike. A request's latency is the
slowest rank's (galaxy.app.infer.serve).
"""
from dataclasses import replace

import torch

from benchmarks.common import bert_cfg, median, parser, svg_bars, table, write_results
from galaxy.app.infer import forward_fn, serve
from galaxy.comm.context import ParallelContext
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.planner.replan import Replanner
from galaxy.planner.run import profile_and_plan
from galaxy.profiler.emulate import Throughput, check_gflops, parse_gflops
from galaxy.runtime.launch import spawn


def _one(forward, ids, ctx):
    """One request's latency (the slowest rank's)."""
    return [latency for _, latency in serve(forward, [(ids, None)], ctx)][0]


def bench(rank, world, args):
    cfg = bert_cfg("galaxy", args.layers, args.seq, 1, model="bert",
                   replan={"threshold": args.threshold, "patience": args.patience})
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    live = Replanner(build_model(cfg, ctx).eval(), ctx, cfg, log=print if rank == 0 else (lambda line: None))
    ids = torch.randint(5, cfg["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(0))
    serve_live = (lambda ids, mask: forward_fn(live.model, "bert")(ids, mask))
    device, before = Throughput(args.devices[rank]), []
    with device:
        for request in range(1, args.before + 1):
            before.append(_one(serve_live, ids, ctx))
            live.after_step(request)
        device.set(args.slowed[rank])
        split = profile_and_plan(cfg.replace(data=replace(cfg.data, batch_size=1)), world)[0]
    planned_cfg = cfg.with_layout(**{k: v for k, v in split.items() if k != "parallel"})
    planned = build_model(planned_cfg, replace(ctx, plan=build_plan(planned_cfg, world))).eval()
    with device:
        during, after, beside, request = [], [], [], args.before
        while len(after) < args.after and request < args.before + args.most_slowed:
            request += 1
            (after if live.moves else during).append(_one(serve_live, ids, ctx))
            beside.append((bool(live.moves), _one(forward_fn(planned, "bert"), ids, ctx)))
            live.after_step(request)
    return dict(before=before, during=during, after=after, planned=[s for moved, s in beside if moved],
                planned_during=[s for moved, s in beside if not moved],
                moves=[(step, list(b.heads), list(a.heads), list(a.columns), list(a.positions), s)
                       for step, b, a, _, _, s in live.moves],
                planned_split=[split[k] for k in ("tp_num_attention_heads_list", "tp_intermediate_size_list",
                                                 "seq_scatter_list")])


def main():
    p = parser(__doc__, batch=1)
    p.set_defaults(layers=2, seq=128)
    p.add_argument("--devices", type=parse_gflops, default=[16.0, 16.0], help="GFLOP/s per rank (the world)")
    p.add_argument("--slowed", type=parse_gflops, default=[16.0, 8.0], help="GFLOP/s per rank after --before requests")
    p.add_argument("--before", type=int, default=6, help="requests before the slow-down")
    p.add_argument("--after", type=int, default=10, help="requests measured after the re-plan")
    p.add_argument("--most_slowed", type=int, default=40, help="give up when no re-plan came in this many requests")
    p.add_argument("--threshold", type=float, default=0.25)
    p.add_argument("--patience", type=int, default=3)
    args = p.parse_args()
    try:
        check_gflops(args.devices, len(args.devices))
        check_gflops(args.slowed, len(args.devices), "--slowed")
    except ValueError as e:
        p.error(str(e))
    world = len(args.devices)
    r = spawn(bench, world, (args,), timeout_s=args.timeout_s)[0]
    if not r["moves"]:
        raise SystemExit(f"no re-plan within {args.most_slowed} slowed requests "
                         f"(median latency {median(r['during']) * 1e3:.0f} ms)")
    step, old_heads, heads, columns, positions, _ = r["moves"][0]
    ms = {name: median(r[name]) * 1e3 for name in ("before", "during", "after", "planned", "planned_during")}
    even = f"heads {old_heads}"
    rows = [["before the slow-down", even, len(r["before"]), f"{ms['before']:.0f}", ""],
            [f"devices slowed to {args.slowed} GFLOP/s", even, len(r["during"]), f"{ms['during']:.0f}",
             f"{ms['during'] / ms['planned_during']:.2f}x"],
            [f"after re-planning ({len(r['moves'])} move(s))", f"heads {heads} columns {columns} positions {positions}"
             + (" (first move)" if len(r["moves"]) > 1 else ""), len(r["after"]),
             f"{ms['after']:.0f}", f"{ms['after'] / ms['planned']:.2f}x"],
            ["planned from the start", "heads {} columns {} positions {}".format(*r["planned_split"]),
             len(r["planned"]), f"{ms['planned']:.0f}", "1.00x"]]
    print(f"BERT-base widths, Galaxy layout, {args.layers} layers, seq {args.seq}, batch 1, world {world} gloo; "
          f"devices {args.devices} GFLOP/s, {args.slowed} from request {args.before + 1}, re-planned after request {step} "
          f"(threshold {args.threshold}, patience {args.patience}); medians")
    headers = ["phase", "split", "requests", "latency ms", "vs planned (same rounds)"]
    print(table(rows, headers))
    for step, _, heads, columns, positions, move_s in r["moves"]:
        print(f"move after request {step} to heads {heads} columns {columns} positions {positions}: "
              f"{move_s * 1e3:.0f} ms = {move_s * 1e3 / ms['after']:.1f} requests at the latency after re-planning")
    print(f"requests served slowed before the first move: {len(r['during'])}; the planned model in those rounds: "
          f"{ms['planned_during']:.0f} ms")
    values = {("forward latency", row[0]): float(row[3]) for row in rows}
    chart = svg_bars(["forward latency"], [row[0] for row in rows], values,
                     f"Re-planning live, devices {args.devices} -> {args.slowed} GFLOP/s (ms)")
    write_results(args.out_dir, "replan", [dict(zip(headers, map(str, row))) for row in rows], chart)


if __name__ == "__main__":
    main()
