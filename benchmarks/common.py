"""Shared by the benchmark scripts: a BERT-base config per layout, one rank's model and step,
bytes sent per step, and interleaved timing (every layout timed in the same rounds, so load
from other processes on the machine hits all of them alike).

Run the scripts as modules from the repository root: `python -m benchmarks.layouts`.
"""
import argparse
import csv
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy.comm import stats
from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.registry import build_backbone
from galaxy.plan import build_plan
from galaxy.train.grad_sync import GradSync

# Bytes a rank *sends* for a collective, per byte it contributes (galaxy.comm.stats records the
# contributed tensor), for the ring algorithm over p ranks. all_reduce and reduce_scatter
# contribute the whole tensor, all_gather this rank's slice. gloo picks its own algorithms;
# these are the textbook ring volumes, the lower bound a bandwidth-optimal algorithm reaches.
RING_FACTOR = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_gather": lambda p: p - 1,
}


RESULTS = "docs/results"  # where the scripts write their CSV and SVG (the README links them)

LAYOUT_NAMES = ("serial", "tp", "sp", "galaxy", "galaxy2", "dp")


def bert_cfg(layout, layers=4, seq=512, batch=4, **extra):
    """BERT-base sizes (hidden 768, 12 heads, intermediate 3072, vocab 30522), dropout 0."""
    over = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=layers,
                vocab_size=30522, seq_length=seq, max_position_embeddings=max(512, seq), batch_size=batch,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, parallel=layout, data="synthetic")
    over.update(extra)
    return load_config(None, over)


def sent_bytes(counts, p):
    """Convert {kind: contributed bytes} to bytes sent by this rank (ring volumes)."""
    return sum(RING_FACTOR[kind](p) * n for kind, n in counts.items())


class Runner:
    """One layout's backbone (cfg's model: BERT's encoder, LLaMA's decoder stack) on this rank: a
    training step (forward, backward, gradient sync) or an inference forward on a fixed synthetic
    batch. Serial runs on rank 0 alone."""

    def __init__(self, name, cfg, rank, world):
        self.name = name
        plan = build_plan(cfg, 1 if cfg["parallel"] == "serial" else world)
        self.ctx = ParallelContext.create(plan, rank) if plan.world > 1 else ParallelContext(plan, rank)
        self.active = plan.world > 1 or rank == 0
        if not self.active:
            return
        self.model = build_backbone(cfg, self.ctx)
        self.sync = GradSync(self.model, self.ctx, cfg["bucket_size_mb"])
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]), generator=g)
        weight = torch.randn(cfg["batch_size"], cfg["seq_length"], cfg["hidden_size"], generator=g)
        per = cfg["batch_size"] // plan.dp_size  # a data-parallel replica takes its share of the batch
        rows = slice(self.ctx.dp_rank * per, (self.ctx.dp_rank + 1) * per)
        self.ids, self.weight = ids[rows], weight[rows]

    def train_step(self):
        self.model.train()
        self.sync.arm()
        out = self.model(self.ids)
        (out * self.weight).sum().backward()  # a fixed linear loss: every layout gets the same gradient
        self.sync.finish()
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(self):
        self.model.eval()
        return self.model(self.ids)

    def grad_sync_bytes(self):
        """Bytes sent per step by the gradient all-reduces (ring), summed over this rank's groups."""
        total = 0.0
        for part in self.sync.parts:
            if part.group is None:
                continue
            n = sum(p.numel() * p.element_size() for bucket in part.buckets for p in bucket)
            total += RING_FACTOR["all_reduce"](dist.get_world_size(part.group)) * n
        return total

    def activation_bytes(self, step):
        """Bytes sent by the layout's collectives (forward + backward) during one call of `step`;
        the gradient all-reduces are counted by grad_sync_bytes."""
        with stats.count_bytes(phases=(stats.FWD, stats.BWD)) as counts:
            step()
        return sent_bytes(Counter(counts), self.ctx.tp_size)


def interleaved(runners, step_of, repeats, warmup=1):
    """Time `step_of(runner)` for every runner in each round, rotating the order per round.
    A step's time is from a barrier before to a barrier after, i.e. the slowest rank's.
    Returns {name: [seconds per round]} (identical on every rank)."""
    times = {r.name: [] for r in runners}
    for round_ in range(warmup + repeats):
        k = round_ % len(runners)
        for r in runners[k:] + runners[:k]:
            dist.barrier()
            start = time.perf_counter()
            if r.active:
                step_of(r)
            dist.barrier()
            if round_ >= warmup:
                times[r.name].append(time.perf_counter() - start)
    return times


def parser(doc, batch=4):
    """The arguments every BERT-base benchmark shares: model depth, sequence, batch, rounds."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout_s", type=float, default=3000)
    p.add_argument("--out_dir", default=RESULTS, help="where the CSV and SVG of the results go")
    return p


def median(xs):
    return statistics.median(xs)


def table(rows, headers):
    """Plain fixed-width table as a string."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def svg_bars(groups, series, values, title):
    """Grouped bar chart as SVG text: groups on x, one bar per series, values in ms."""
    colors = ["#888888", "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
              "#ff9da7"]
    bar, gap, height, top, left = 18, 30, 300, 40, 60
    width = left + len(groups) * (len(series) * bar + gap) + 160
    vmax = max(values.values()) * 1.1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + top + 80}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="20" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{top + height}" x2="{width - 160}" y2="{top + height}" stroke="black"/>']
    for tick in range(5):
        v = vmax * tick / 4
        y = top + height - height * tick / 4
        parts.append(f'<text x="{left - 5}" y="{y + 4:.0f}" text-anchor="end">{v:.0f}</text>')
    parts.append(f'<text x="12" y="{top + height / 2}" transform="rotate(-90 12 {top + height / 2})">ms</text>')
    for g, group in enumerate(groups):
        x0 = left + gap / 2 + g * (len(series) * bar + gap)
        for s, name in enumerate(series):
            v = values[(group, name)]
            h = height * v / vmax
            parts.append(f'<rect x="{x0 + s * bar:.0f}" y="{top + height - h:.0f}" width="{bar - 2}" '
                         f'height="{h:.0f}" fill="{colors[s % len(colors)]}"><title>{name}: {v:.0f} ms</title></rect>')
        parts.append(f'<text x="{x0 + len(series) * bar / 2:.0f}" y="{top + height + 16}" '
                     f'text-anchor="middle">{group}</text>')
    for s, name in enumerate(series):
        y = top + 14 * s
        parts.append(f'<rect x="{width - 150}" y="{y}" width="10" height="10" fill="{colors[s % len(colors)]}"/>'
                     f'<text x="{width - 135}" y="{y + 9}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_results(out_dir, stem, rows, svg):
    """rows (dicts with the same keys) to out_dir/stem.csv and the chart to out_dir/stem.svg."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.svg").write_text(svg)
    print(f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.svg'}")
