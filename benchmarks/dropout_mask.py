"""Dropout mask cost per BERT-base layer on one rank's shard, at world 1, 2 and 4: the old mask
(draw the whole tensor's, keep the slice) against the counter-based one (galaxy.layers.dropout).

A layer draws one mask over the attention probabilities [batch, 12, seq, seq], sharded by heads
(TP attention), and two over hidden states [batch, seq, 768], sharded by positions (SP connective
blocks). A shard is 1/world of the heads or positions, timed on this one process with one thread
(one rank's core).

    python -m benchmarks.dropout_mask
    python -m benchmarks.dropout_mask --seq 128 --repeats 9
"""
import argparse
import time

import torch

from benchmarks.common import median, table
from galaxy.layers.dropout import LayoutInvariantDropout

P = 0.1


def old_mask(full_shape, index, seed):
    """The old galaxy.layers.dropout's mask: draw the whole tensor's, keep this rank's slice."""
    keep = torch.rand(full_shape, generator=torch.Generator().manual_seed(seed))[index]
    return (keep >= P).to(torch.float32)


def layer_masks(batch, seq, world):
    """(full shape, this shard's index) of the layer's three masks, for rank 0 of `world`."""
    heads, rows = slice(0, 12 // world), slice(0, seq // world)
    return [((batch, 12, seq, seq), (slice(None), heads)),
            ((batch, seq, 768), (slice(None), rows)),
            ((batch, seq, 768), (slice(None), rows))]


def time_layer(mask_of, masks):
    """Seconds to make the layer's masks."""
    start = time.perf_counter()
    for full, index in masks:
        mask_of(full, index)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    new = LayoutInvariantDropout(P, site=1)
    ways = {"old": lambda full, index: old_mask(full, index, 1234),
            "new": lambda full, index: new.mask(full, index, torch.float32, "cpu")}
    times = {(w, name): [] for w in (1, 2, 4) for name in ways}
    for round_ in range(args.repeats + 1):  # round 0 warms up; old and new alternate within a round
        for (world, name), got in times.items():
            seconds = time_layer(ways[name], layer_masks(args.batch, args.seq, world))
            if round_:
                got.append(seconds)
    rows = []
    for world in (1, 2, 4):
        old, ours = (median(times[world, name]) * 1e3 for name in ways)
        rows.append([world, f"{old:.1f}", f"{ours:.1f}", f"{old / ours:.1f}x"])
    print(f"dropout masks per BERT-base layer (attention probs [{args.batch}, 12, {args.seq}, {args.seq}] by heads, "
          f"2 x hidden [{args.batch}, {args.seq}, 768] by positions), one shard, 1 thread, median of {args.repeats}:")
    print(table(rows, ["world", "old: whole + slice, ms", "new: counter-based, ms", "speed-up"]))


if __name__ == "__main__":
    main()
