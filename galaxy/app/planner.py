"""Heterogeneity-aware planner: measure each rank's speed on the model's own blocks and the link
bandwidth, choose the Galaxy head / intermediate / sequence splits (and, for a pipeline, the
layers of each stage) that minimise the predicted latency within memory budgets, write them into
a config, and check the prediction: the even split and the planned one (with each --tiles) are
timed in interleaved rounds until one is clearly fastest, else (after --repeats rounds) the fastest
median of the close ones is taken, or a simpler one within 2% of it (galaxy.planner.check); --out keeps it.

    python -m galaxy.planner --config train_config/bert/galaxy/full.json --world 2
    python -m galaxy.planner --config ... --world 2 --slow_rank 1 --out planned.json
    python -m galaxy.planner --config ... --world 2 --memory_mb 400 100
    python -m galaxy.planner --config train_config/bert/pp/full.json --world 2 --slow_rank 1
    python -m galaxy.planner --config ... --world 2 --tiles 1 2 4     # also pick overlap_tiles, measured

A pipeline comes from the config's stage_num_hidden_layers_list (its length is the number of
stages) or --stages; each stage's world / stages ranks run the Galaxy layout (plain pipelining
with one rank per stage). Data parallelism is not planned. Latencies are of the encoder's
forward pass (inference; a pipeline runs num_microbatches micro-batches through its stages);
the cost model is in galaxy.planner.split.
"""
import argparse
import json
from pathlib import Path

from galaxy.comm.overlap import parse_tiles
from galaxy.config.load import load_config, read_config
from galaxy.planner.check import MIN_ROUNDS
from galaxy.planner.run import plan_and_check
from galaxy.planner.split import layer_param_bytes
from galaxy.runtime.launch import RankFailed, spawn


def main():
    p = argparse.ArgumentParser(prog="python -m galaxy.planner", description=__doc__.splitlines()[0])
    p.add_argument("--config", "--config_file", dest="config", required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--out", default=None, help="write the config with the splits the check picked here")
    p.add_argument("--memory_mb", type=float, nargs="+", default=None, help="per-rank budget for layer parameters")
    p.add_argument("--column_unit", type=int, default=1, help="intermediate columns move in multiples of this")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the config's)")
    p.add_argument("--slow_rank", type=int, default=None, help="emulate a slower device on this rank")
    p.add_argument("--slow_factor", type=int, default=2, help="how many times slower --slow_rank is")
    p.add_argument("--tiles", type=parse_tiles, nargs="+", default=[1],
                   help="overlap_tiles candidates, a count or tile sizes (2 4 1,3): the planned split is checked "
                        "with each")
    p.add_argument("--repeats", type=int, default=12,
                   help=f"most rounds of the check of the candidates (at least {MIN_ROUNDS}; it stops once one "
                        f"is clearly fastest)")
    p.add_argument("--timeout_s", type=float, default=1800)
    args = p.parse_args()
    cfg = load_config(args.config, {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    args.stages = args.stages or len(cfg["stage_num_hidden_layers_list"] or [None])
    _check_args(p, cfg, args)
    cfg = cfg.with_layout(parallel="galaxy" if args.world > args.stages else "pp", tp_num_attention_heads_list=None,
                          tp_intermediate_size_list=None, seq_scatter_list=None,
                          stage_num_hidden_layers_list=None)  # the planner decides the splits
    try:
        r = spawn(plan_and_check, args.world, (cfg, args), timeout_s=args.timeout_s)[0]
    except RankFailed as e:  # e.g. budgets too tight for the measured splits
        p.exit(1, f"galaxy: planner: {e.line}\n")
    print(f"link bandwidth (all-gather, bytes sent per rank): {r['bandwidth'] / 1e6:.1f} MB/s")
    for rank, prof in enumerate(r["profiles"]):
        print(f"rank {rank}: {prof['att_s_per_head'] * 1e3:.2f} ms/head  {prof['mlp_s_per_column'] * 1e6:.2f} us/column  "
              f"{prof['con_s_per_position'] * 1e6:.2f} us/position  {prof['embed_s'] * 1e3:.2f} ms embeddings")
    print(f"planned  {_describe(r['split'])}: predicted {r['predicted'] * 1e3:.0f} ms (untiled)")
    print(f"even     {_describe(r['even'])}: predicted {r['even_predicted'] * 1e3:.0f} ms")
    for name, seconds in r["measured"].items():
        print(f"measured {name}: {seconds * 1e3:.0f} ms (median of {r['rounds'][name]} rounds)")
    planned = min((name for name in r["measured"] if name != "even"), key=r["measured"].get)
    print(f"measured speed-up of {planned} over even split: {r['measured']['even'] / r['measured'][planned]:.2f}x")
    how = "clearly fastest" if r["decided"] else "the leader by medians of the close ones"
    print(f"kept: {r['best']} ({_describe(r['chosen'])}); {how} after {max(r['rounds'].values())} rounds")
    if args.out:
        raw = read_config(args.config)  # its parts merged: the written config stands alone
        raw.pop("stage_num_hidden_layers_list", None)  # the plan's replaces it; none when not pipelined
        raw.update(r["chosen"])
        Path(args.out).write_text(json.dumps(raw, indent=2) + "\n")
        print(f"wrote {args.out}")


def _check_args(p, cfg, args):
    """Errors the ranks would otherwise meet only after profiling."""
    if args.world < 2:
        p.error(f"--world {args.world}: the planner splits a model over at least 2 ranks")
    if args.memory_mb and len(args.memory_mb) != args.world:
        p.error(f"--memory_mb has {len(args.memory_mb)} entries for --world {args.world}")
    if args.memory_mb:
        _check_memory(p, cfg, args.memory_mb, cfg["num_hidden_layers"] // args.stages)
    if args.repeats < MIN_ROUNDS:
        p.error(f"--repeats {args.repeats}: the check needs at least {MIN_ROUNDS} rounds to tell candidates apart")
    if args.slow_factor < 1:
        p.error(f"--slow_factor {args.slow_factor} must be at least 1")
    if args.stages < 1 or args.world % args.stages:
        p.error(f"--world {args.world} is not a multiple of {args.stages} pipeline stages")
    if cfg["num_hidden_layers"] < args.stages:
        p.error(f"num_hidden_layers {cfg['num_hidden_layers']} cannot fill {args.stages} pipeline stages")
    if args.stages > 1 and cfg["batch_size"] % cfg["num_microbatches"]:
        p.error(f"batch_size {cfg['batch_size']} does not split into num_microbatches {cfg['num_microbatches']}")
    if (cfg["data_parallel_size"] or 1) > 1:
        p.error(f"data_parallel_size {cfg['data_parallel_size']}: the planner does not plan data parallelism")


def _check_memory(p, cfg, memory_mb, stage_layers):
    """The budgets must hold every layer's parameters between them, and each rank at least one
    head and one intermediate column of each layer of its stage (the planner's exact caps,
    checked after profiling, may still ask for more)."""
    per_head, per_col = layer_param_bytes(cfg["hidden_size"], cfg["num_attention_heads"])
    need = cfg["num_hidden_layers"] * (cfg["num_attention_heads"] * per_head + cfg["intermediate_size"] * per_col)
    if sum(memory_mb) * 2**20 < need:
        p.error(f"--memory_mb {memory_mb} sums to {sum(memory_mb):g} MB; the layers' parameters need "
                f"{need / 2**20:.1f} MB")
    least = stage_layers * (per_head + per_col)
    if min(memory_mb) * 2**20 < least:
        p.error(f"--memory_mb {min(memory_mb):g} cannot hold one head and one intermediate column of "
                f"{stage_layers} layer(s) ({least / 2**20:.2f} MB)")


SPLIT_NAMES = {"tp_num_attention_heads_list": "heads", "tp_intermediate_size_list": "columns",
               "seq_scatter_list": "positions", "stage_num_hidden_layers_list": "stage layers",
               "overlap_tiles": "overlap_tiles"}


def _describe(split):
    return " ".join(f"{name} {split[key]}" for key, name in SPLIT_NAMES.items() if key in split)


if __name__ == "__main__":
    main()
