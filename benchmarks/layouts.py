"""Training-step time and bytes sent per rank for every layout, side by side, at world 2 (gloo).

    python -m benchmarks.layouts                 # BERT-base sizes, 4 layers, seq 512, batch 4
    python -m benchmarks.layouts --layers 12 --repeats 3

The encoder (embeddings + layers, the part the layouts split) runs forward and backward on a
synthetic batch with dropout 0; the loss is a fixed linear function of the (replicated) output,
so no MLM head is timed (it would be replicated identically in every layout). Gradient sync is
part of the step. Serial runs on rank 0 alone while rank 1 waits (one device's speed).
Steps are interleaved: each round runs every layout once, order rotated; medians are reported.
Bytes: what galaxy.comm.stats records per collective kind, converted to bytes *sent* per rank
with ring-algorithm factors (benchmarks.common.RING_FACTOR), plus the gradient all-reduces.
"""

import torch

from benchmarks.common import LAYOUT_NAMES, Runner, bert_cfg, interleaved, median, parser, table
from galaxy.runtime.launch import spawn


def bench(rank, world, args):
    runners = [Runner(name, bert_cfg(name, args.layers, args.seq, args.batch), rank, world)
               for name in args.layouts]
    times = interleaved(runners, Runner.train_step, args.repeats)
    sent = {}
    for r in runners:
        act = r.activation_bytes(r.train_step) if r.active else 0.0
        sent[r.name] = (act, r.grad_sync_bytes() if r.active else 0.0)
    return times, sent, torch.get_num_threads()


def main():
    p = parser(__doc__)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUT_NAMES))
    args = p.parse_args()
    results = spawn(bench, 2, (args,), timeout_s=args.timeout_s)
    times = results[0][0]
    base = median(times["serial"]) if "serial" in times else None
    rows = []
    for name in args.layouts:
        t = median(times[name])
        act, grad = results[0][1][name]  # rank 0; world 2 layouts here are symmetric in bytes up to uneven splits
        rows.append([name, f"{t * 1e3:.0f}", f"{min(times[name]) * 1e3:.0f}", f"{max(times[name]) * 1e3:.0f}",
                     f"{base / t:.2f}x" if base else "-", f"{act / 2**20:.1f}", f"{grad / 2**20:.1f}",
                     f"{(act + grad) / 2**20:.1f}"])
    print(f"BERT-base encoder ({args.layers} layers, hidden 768, 12 heads), seq {args.seq}, batch {args.batch}, "
          f"world 2 gloo, {results[0][2]} thread/rank, {args.repeats} interleaved rounds")
    print(table(rows, ["layout", "median ms", "min ms", "max ms", "speedup vs serial",
                       "act MiB sent/rank", "grad MiB sent/rank", "total MiB sent/rank"]))


if __name__ == "__main__":
    main()
