"""Profile every rank, plan the Galaxy splits, and measure the planned layout against the
even split (forward latency, interleaved). Runs on every rank of a started process group."""
import statistics
import time

import torch
import torch.distributed as dist

from galaxy.comm.context import ParallelContext
from galaxy.models.bert.model import BertConfig, BertModel, init_weights
from galaxy.plan import build_plan
from galaxy.planner.profile import measure_bandwidth, measure_blocks, slow_down
from galaxy.planner.split import even_galaxy, plan_galaxy, predict_layer_seconds


def profile_and_plan(cfg, world, memory_bytes=float("inf"), column_unit=1):
    """Gather every rank's profile; every rank then computes the same plan. Returns
    (split keys, predicted seconds, even split keys, its predicted seconds, profiles, bandwidth)."""
    mine = measure_blocks(cfg, memory_bytes)
    profiles = [None] * world
    dist.all_gather_object(profiles, mine)
    bandwidth = measure_bandwidth()
    dims = dict(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"], intermediate=cfg["intermediate_size"],
                seq=cfg["seq_length"], layers=cfg["num_hidden_layers"], batch=cfg["batch_size"])
    split, predicted = plan_galaxy(profiles, bandwidth_Bps=bandwidth, column_unit=column_unit, **dims)
    even = even_galaxy(world, heads=dims["heads"], intermediate=dims["intermediate"], seq=dims["seq"])
    even_predicted = dims["layers"] * predict_layer_seconds(even, profiles, dims["batch"], dims["hidden"], bandwidth)
    return split, predicted, even, even_predicted, profiles, bandwidth


def _model(cfg, split, rank, world):
    cfg = dict(cfg, **split)
    ctx = ParallelContext.create(build_plan(cfg, world), rank)
    model = BertModel(BertConfig.from_dict(cfg), ctx).eval()
    init_weights(model, cfg["initializer_range"])
    return model


@torch.no_grad()
def measure_forward(cfg, splits, rank, world, repeats=3):
    """Median forward seconds of the encoder per split (name -> keys), timed interleaved between barriers."""
    models = {name: _model(cfg, split, rank, world) for name, split in splits.items()}
    ids = torch.randint(5, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]),
                        generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            model(ids)
            dist.barrier()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plan_and_check(rank, world, cfg, args):
    """One rank of `python -m galaxy.planner` (module-level so spawned ranks can import it):
    optional slow-down, profile, plan, then measure the planned and the even split."""
    stop = slow_down(rank, {args.slow_rank}) if args.slow_rank is not None else None
    memory = args.memory_mb[rank] * 2**20 if args.memory_mb else float("inf")
    split, predicted, even, even_predicted, profiles, bandwidth = profile_and_plan(cfg, world, memory, args.column_unit)
    measured = measure_forward(cfg, {"planned": split, "even": even}, rank, world, args.repeats)
    if stop is not None:
        stop.set()
    return dict(split=split, predicted=predicted, even=even, even_predicted=even_predicted,
                profiles=[vars(p) for p in profiles], bandwidth=bandwidth, measured=measured)
