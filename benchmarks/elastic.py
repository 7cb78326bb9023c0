"""--elastic inference: how long serving stops when a rank is lost, in place (the survivors keep
their weights, galaxy.app.infer.Server) against a restart (new processes load the checkpoint in the
survivors' layout, as --elastic training and pipeline inference do), and how fast the survivors serve
after recovering, against a model planned for the survivors from the start (benchmarks.replan's
"planned": the planner's profile and split on the survivors' devices). Galaxy layout, batch 1,
weights from a load_checkpoint file, gloo; BERT-large width by default (benchmarks.paper.MODELS).

    python -m benchmarks.elastic                                  # world 3 -> 2 on loopback, the host's speed
    sudo python -m benchmarks.elastic --devices 8,8,8,8 --link 100mbit --requests 10   # issue 23's regime

The second command is issue 23's "a device leaves": 4 edge devices of 8 GFLOP/s emulated by throughput
(galaxy.profiler.emulate, paper.py's device class), each in its own network namespace behind a shaped
link (benchmarks.netem), world 4 -> 3 in place: about 1.5 minutes on an idle 2-core machine (128 s
under load, load average ~15; quiet: docs/elastic.md).

In place: rank 1 SIGKILLs itself after request --before; the serving stop runs from its death (a
time it writes just before) to the end of the first request the survivors serve after it: the
launcher noticing the death, the survivors' regroup and rebuild, the request. Then --requests rounds
each serve one request on the recovered model and one on the model planned for the survivors from the
start (so load from other processes hits both alike); their medians and ratio are printed. Restart:
from spawning the survivors' count of new ranks (over --link: in the namespaces already set up; the
launcher's notice not counted) to the end of their first request: process start, rendezvous, building
the model and loading the checkpoint, the request. Both print the bytes read from the checkpoint.
"""
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median, parser, table
from benchmarks.netem import ranks_over, rate_bits
from benchmarks.paper import MODELS, paper_cfg
from benchmarks.replan import SPLIT_KEYS, one_request, plan_for_now, planned_model, split_text
from galaxy.app import infer
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.profiler import emulate
from galaxy.runtime import elastic

LOST = 1


def _requests(cfg, count):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(5, cfg["vocab_size"], (1, cfg["seq_length"]), generator=g), None) for _ in range(count)]


def _dying_serve(serve, after, world, died_file):
    def serve_then_die(forward, batches, ctx, *rest):
        for served, result in enumerate(serve(forward, batches, ctx, *rest), 1):
            yield result
            if (ctx.rank, served, ctx.world) == (LOST, after, world):
                Path(died_file).write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
    return serve_then_die


def in_place(rank, world, cfg, before, after, died_file, devices, rounds):
    """Serve before + after requests losing rank LOST, then `rounds` beside a model planned for the
    survivors; returns (end time of each request, recoveries, beside_planned's) (None: the lost rank)."""
    infer.serve = _dying_serve(infer.serve, before, world, died_file)  # the Server calls this module's serve
    model, ctx = infer.eval_model(cfg, build_plan(cfg, world), rank)
    device = emulate.device(devices, {}, rank)
    server = infer.Server(model, ctx, cfg, regroups=1, device=device)
    ends = []
    with device:
        server.run(_requests(cfg, before + after), keep=lambda out: ends.append(time.time()))
    return ends, server.recoveries, beside_planned(server, device, rounds)


def beside_planned(server, device, rounds):
    """Latencies of `rounds` requests on the server's (recovered) model and, in the same rounds, on
    a model planned from the start for its ranks' devices, and both splits."""
    cfg, ctx = server.cfg, server.ctx
    with device:
        split = plan_for_now(cfg, ctx.world)
    planned = planned_model(cfg, split, ctx, ctx.world)
    ids = _requests(cfg, 1)[0][0]
    live, beside = [], []
    with device:
        for _ in range(rounds):
            live.append(one_request(infer.forward_fn(server.model, cfg["model"]), ids, ctx))
            beside.append(one_request(infer.forward_fn(planned, cfg["model"]), ids, ctx))
    return dict(live=live, planned=beside, live_split=split_text(ctx.plan.heads, ctx.plan.columns, ctx.plan.positions),
                planned_split=split_text(*(split[k] for k in SPLIT_KEYS)))


def restart(rank, world, cfg, devices):
    """What a restarted survivor does before its first request is served; returns (end time,
    bytes its model holds: all read from the checkpoint or drawn)."""
    model, ctx = infer.eval_model(cfg, build_plan(cfg, world), rank)
    with emulate.device(devices, {}, rank) as device:
        infer.Server(model, ctx, cfg, device=device).run(_requests(cfg, 1))
    return time.time(), sum(p.numel() * p.element_size() for p in model.parameters())


def check_args(p, args):
    """Bad flags fail before any namespace or process starts; returns the world."""
    world = len(args.devices) if args.devices else args.world
    if args.devices:
        try:
            emulate.check_gflops(args.devices, world, "--devices")
        except ValueError as e:
            p.error(str(e))
    if world < 3:
        p.error(f"world {world}: losing rank {LOST} in place needs 3 ranks or more (2 survivors)")
    if args.link is not None:
        try:
            rate_bits(args.link)
        except ValueError as e:
            p.error(f"--link: {e}")
    if min(args.before, args.after, args.requests) < 1:
        p.error("--before, --after and --requests >= 1")
    return world


def main(argv=None):
    p = parser(__doc__, batch=1)
    p.set_defaults(layers=4, seq=128)
    p.add_argument("--world", type=int, default=3, help="ranks at the start (without --devices)")
    p.add_argument("--devices", type=emulate.parse_gflops, default=None,
                   help="GFLOP/s per rank, each an emulated device (sets the world); the host's speed when not given")
    p.add_argument("--link", default=None, help="link rate of every rank (tc units: 100mbit, 500mbit, 1gbit), "
                   "each rank in its own network namespace (root); loopback when not given")
    p.add_argument("--model", choices=sorted(MODELS), default="bert")
    p.add_argument("--before", type=int, default=3, help="requests served before rank 1 dies")
    p.add_argument("--after", type=int, default=3, help="requests served after")
    p.add_argument("--requests", type=int, default=5,
                   help="rounds after recovery, each a request on the recovered and on the planned model")
    p.add_argument("--skip_restart", action="store_true", help="only the in-place figures (no restart to compare)")
    args = p.parse_args(argv)
    world = check_args(p, args)
    survivor_devices = args.devices and [g for r, g in enumerate(args.devices) if r != LOST]
    with tempfile.TemporaryDirectory() as tmp, ranks_over(args.link, world, prefix="gxela") as (call, shaping):
        share = args.seq // world  # positions split as evenly as they go
        cfg = paper_cfg(MODELS[args.model], args.layers, args.seq, parallel="galaxy", load_checkpoint=f"{tmp}/ckpt",
                        timeout_s=args.timeout_s,
                        seq_scatter_list=[args.seq - (world - 1) * share] + [share] * (world - 1))
        build_model(cfg.with_layout(parallel="serial")).save_hf(f"{tmp}/ckpt")
        results = call("benchmarks.elastic:in_place", world,
                       (cfg, args.before, args.after, f"{tmp}/died", args.devices, args.requests), args.timeout_s,
                       regroups=1)
        died = float(Path(f"{tmp}/died").read_text())
        survivors_cfg, plan = elastic.survivors_plan(cfg, build_plan(cfg, world), [LOST])
        start = time.time()
        restarted = None if args.skip_restart else call("benchmarks.elastic:restart", world - 1,
                                                        (survivors_cfg, survivor_devices), args.timeout_s)
    ends, recoveries, after = results[0]
    moved = recoveries[0]
    gap_in_place = ends[args.before] - died
    mib = 2 ** 20
    rows = [["in place", f"{gap_in_place:.2f}", f"{moved['seconds']:.2f}", f"{moved['rebuilt'] / mib:.1f}",
             f"{moved['kept'] / mib:.1f} kept, {moved['received'] / mib:.1f} received"]]
    if restarted:
        gap_restart = max(end for end, _ in restarted) - start
        read_restart = sum(size for _, size in restarted)
        rows.append(["restart", f"{gap_restart:.2f}", "", f"{read_restart / mib:.1f}", "all read again"])
    devices = f"devices {args.devices} GFLOP/s" if args.devices else "the host's speed"
    print(f"{args.model} x{args.layers} layers, seq {args.seq}, batch 1, Galaxy world {world} -> {world - 1} (gloo, "
          f"{shaping}), {devices}, rank {LOST} lost after request {args.before}; survivors' plan {plan.describe()}")
    print(table(rows, ["survivors go on", "serving stops s", "of it re-planning s", "MiB from the checkpoint",
                       "the survivors' weights"]))
    if restarted:
        print(f"in place / restart: {gap_in_place / gap_restart:.2f}x the stop, "
              f"{moved['rebuilt'] / read_restart:.2f}x the bytes read")
    live, planned = median(after["live"]) * 1e3, median(after["planned"]) * 1e3
    print(table([["recovered in place", after["live_split"], len(after["live"]), f"{live:.1f}",
                  f"{min(after['live']) * 1e3:.1f}", f"{max(after['live']) * 1e3:.1f}", f"{live / planned:.3f}x"],
                 ["planned for the survivors from the start", after["planned_split"], len(after["planned"]),
                  f"{planned:.1f}", f"{min(after['planned']) * 1e3:.1f}", f"{max(after['planned']) * 1e3:.1f}",
                  "1.000x"]],
                ["after recovery", "split", "requests", "median ms", "min ms", "max ms", "vs planned"]))
    return dict(stop_in_place_s=gap_in_place, stop_restart_s=restarted and gap_restart, recovered_ms=live,
                planned_ms=planned, recovered_vs_planned=live / planned)


if __name__ == "__main__":
    main()
