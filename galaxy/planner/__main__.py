"""Heterogeneity-aware planner: measure each rank's speed on the model's own blocks and the link
bandwidth, choose the Galaxy head / intermediate / sequence splits that minimise the predicted
latency within memory budgets, write them into a config, and check the prediction.

    python -m galaxy.planner --config train_config/bert/galaxy/full.json --world 2
    python -m galaxy.planner --config ... --world 2 --slow_rank 1 --out planned.json
    python -m galaxy.planner --config ... --world 2 --memory_mb 400 100

Latencies are of the encoder's forward pass (inference); the cost model is in galaxy.planner.split.
Pipeline stage splits (stage_num_hidden_layers_list) are not planned.
"""
import argparse
import json
from pathlib import Path

from galaxy.comm.launch import spawn
from galaxy.planner.run import plan_and_check
from galaxy.train.config import load_config


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", "--config_file", dest="config", required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--out", default=None, help="write the config with the planned splits here")
    p.add_argument("--memory_mb", type=float, nargs="+", default=None, help="per-rank budget for layer parameters")
    p.add_argument("--column_unit", type=int, default=1, help="intermediate columns move in multiples of this")
    p.add_argument("--slow_rank", type=int, default=None, help="emulate a 2x slower device on this rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout_s", type=float, default=1800)
    args = p.parse_args()
    if args.memory_mb and len(args.memory_mb) != args.world:
        p.error(f"--memory_mb has {len(args.memory_mb)} entries for --world {args.world}")
    cfg = load_config(args.config, {"parallel": "galaxy", "hidden_dropout_prob": 0.0,
                                    "attention_probs_dropout_prob": 0.0})
    for key in ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list"):
        cfg[key] = None  # the planner decides these
    r = spawn(plan_and_check, args.world, (cfg, args), timeout_s=args.timeout_s)[0]
    print(f"link bandwidth (all-gather, bytes sent per rank): {r['bandwidth'] / 1e6:.1f} MB/s")
    for rank, prof in enumerate(r["profiles"]):
        print(f"rank {rank}: {prof['att_s_per_head'] * 1e3:.2f} ms/head  {prof['mlp_s_per_column'] * 1e6:.2f} us/column  "
              f"{prof['con_s_per_position'] * 1e6:.2f} us/position")
    for name, split, predicted in (("planned", r["split"], r["predicted"]), ("even", r["even"], r["even_predicted"])):
        print(f"{name:8s} heads {split['tp_num_attention_heads_list']} columns {split['tp_intermediate_size_list']} "
              f"positions {split['seq_scatter_list']}: predicted {predicted * 1e3:.0f} ms, "
              f"measured {r['measured'][name] * 1e3:.0f} ms")
    print(f"measured speed-up of planned over even split: {r['measured']['even'] / r['measured']['planned']:.2f}x")
    if args.out:
        raw = json.loads(Path(args.config).read_text())
        raw.update(r["split"])
        Path(args.out).write_text(json.dumps(raw, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
