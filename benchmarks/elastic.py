"""--elastic inference: how long serving stops when a rank is lost, in place (the survivors keep
their weights, galaxy.app.infer.Server) against a restart (new processes load the checkpoint in the
survivors' layout, as --elastic training and pipeline inference do). BERT-base widths, Galaxy
layout, world 3 -> 2, weights from a load_checkpoint file, gloo.

    python -m benchmarks.elastic                 # 4 layers, seq 128
    python -m benchmarks.elastic --layers 12

In place: rank 1 SIGKILLs itself after request --before; the gap runs from its death (a time it
writes just before) to the end of the first request the survivors serve after it: the launcher
noticing the death, the survivors' regroup and rebuild, the request. Restart: from spawning the
2 new ranks (the launcher's notice not counted) to the end of their first request: process start,
rendezvous, building the model and loading the checkpoint, the request. Both print the bytes
read from the checkpoint.
"""
import os
import signal
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import bert_cfg, parser, table
from galaxy.app import infer
from galaxy.models.registry import build_model
from galaxy.plan import build_plan
from galaxy.runtime import elastic
from galaxy.runtime.launch import spawn

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


def in_place(rank, world, cfg, before, after, died_file):
    """Serve before + after requests losing rank LOST; returns (end time of each request, recoveries)."""
    infer.serve = _dying_serve(infer.serve, before, world, died_file)  # the Server calls this module's serve
    model, ctx = infer.eval_model(cfg, build_plan(cfg, world), rank)
    server = infer.Server(model, ctx, cfg, regroups=1)
    ends = []
    server.run(_requests(cfg, before + after), keep=lambda out: ends.append(time.time()))
    return ends, server.recoveries


def restart(rank, world, cfg):
    """What a restarted survivor does before its first request is served; returns (end time,
    bytes its model holds: all read from the checkpoint or drawn)."""
    model, ctx = infer.eval_model(cfg, build_plan(cfg, world), rank)
    infer.Server(model, ctx, cfg).run(_requests(cfg, 1))
    return time.time(), sum(p.numel() * p.element_size() for p in model.parameters())


def main():
    p = parser(__doc__, batch=1)
    p.set_defaults(layers=4, seq=128)
    p.add_argument("--before", type=int, default=3, help="requests served before rank 1 dies")
    p.add_argument("--after", type=int, default=3, help="requests served after")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        third = args.seq // 3  # positions split as evenly as they go
        cfg = bert_cfg("galaxy", args.layers, args.seq, 1, load_checkpoint=f"{tmp}/ckpt", timeout_s=args.timeout_s,
                       seq_scatter_list=[args.seq - 2 * third, third, third])
        build_model(dict(cfg, parallel="serial")).save_hf(f"{tmp}/ckpt")
        results = spawn(in_place, 3, (cfg, args.before, args.after, f"{tmp}/died"), timeout_s=args.timeout_s,
                        regroups=1)
        died = float(Path(f"{tmp}/died").read_text())
        survivors_cfg, plan = elastic.survivors_plan(cfg, build_plan(cfg, 3), [LOST])
        start = time.time()
        restarted = spawn(restart, 2, (survivors_cfg,), timeout_s=args.timeout_s)
    ends, recoveries = results[0]
    moved = recoveries[0]
    gap_in_place = ends[args.before] - died
    gap_restart = max(end for end, _ in restarted) - start
    read_restart = sum(size for _, size in restarted)
    mib = 2 ** 20
    rows = [["in place", f"{gap_in_place:.2f}", f"{moved['seconds']:.2f}", f"{moved['rebuilt'] / mib:.1f}",
             f"{moved['kept'] / mib:.1f} kept, {moved['received'] / mib:.1f} received"],
            ["restart", f"{gap_restart:.2f}", "", f"{read_restart / mib:.1f}", "all read again"]]
    print(f"BERT-base widths, {args.layers} layers, seq {args.seq}, batch 1, Galaxy world 3 -> 2 (gloo), "
          f"rank {LOST} lost after request {args.before}; survivors' plan {plan.describe()}")
    print(table(rows, ["survivors go on", "serving stops s", "of it re-planning s", "MiB from the checkpoint",
                       "the survivors' weights"]))
    print(f"in place / restart: {gap_in_place / gap_restart:.2f}x the stop, "
          f"{moved['rebuilt'] / read_restart:.2f}x the bytes read")


if __name__ == "__main__":
    main()
