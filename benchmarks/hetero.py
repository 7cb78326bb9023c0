"""One rank slowed 2x (each of its torch calls takes twice its time: planner.profile.slow_down):
Galaxy with the even split vs the planner's split (galaxy.planner), BERT-base sizes, world 2 gloo, forward latency.

    python -m benchmarks.hetero                      # 4 layers, seq 512, batch 1
    python -m benchmarks.hetero --layers 12 --repeats 5
"""

from benchmarks.common import bert_cfg, parser, svg_bars, table, write_results
from galaxy.planner.profile import slow_down
from galaxy.planner.run import measure_forward, profile_and_plan
from galaxy.runtime.launch import spawn


def bench(rank, world, args):
    cfg = bert_cfg("galaxy", args.layers, args.seq, args.batch)
    with slow_down(rank, {args.slow_rank}):
        split, predicted, even, even_predicted, profiles, _ = profile_and_plan(cfg, world, column_unit=64)
        measured = measure_forward(cfg, {"even": even, "planner": split}, rank, world, args.repeats)
    return {"even": (even, even_predicted, measured["even"]), "planner": (split, predicted, measured["planner"]),
            "profiles": profiles}


def main():
    p = parser(__doc__, batch=1)
    p.add_argument("--slow_rank", type=int, default=1)
    args = p.parse_args()
    r = spawn(bench, 2, (args,), timeout_s=args.timeout_s)[0]
    slow, fast = r["profiles"][args.slow_rank], r["profiles"][1 - args.slow_rank]
    print(f"rank {args.slow_rank} slowed; measured slow/fast cost per head {slow.att_s_per_head / fast.att_s_per_head:.2f}x, "
          f"per column {slow.mlp_s_per_column / fast.mlp_s_per_column:.2f}x, "
          f"per position {slow.con_s_per_position / fast.con_s_per_position:.2f}x")
    rows = []
    for name in ("even", "planner"):
        split, predicted, measured = r[name]
        rows.append([name, split["tp_num_attention_heads_list"], split["tp_intermediate_size_list"],
                     split["seq_scatter_list"], f"{predicted * 1e3:.0f}", f"{measured * 1e3:.0f}",
                     f"{r['even'][2] / measured:.2f}x"])
    print(f"BERT-base Galaxy layout ({args.layers} layers), seq {args.seq}, batch {args.batch}, world 2 gloo, "
          f"forward, {args.repeats} interleaved rounds (medians)")
    headers = ["split", "heads", "columns", "positions", "predicted ms", "measured ms", "speed-up vs even"]
    print(table(rows, headers))
    group = f"rank {args.slow_rank} slowed"
    values = {(group, f"{name} {kind}"): float(row[col]) for name, row in zip(("even", "planner"), rows, strict=True)
              for kind, col in (("predicted", 4), ("measured", 5))}
    chart = svg_bars([group], [s for _, s in values], values, f"Galaxy forward, {args.layers} layers, world 2 (ms)")
    write_results(args.out_dir, "hetero", [dict(zip(headers, map(str, row), strict=True)) for row in rows], chart)


if __name__ == "__main__":
    main()
