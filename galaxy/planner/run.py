"""Profile every rank, plan the Galaxy splits (and the stage layers of a pipeline), and measure
the planned layout against the even split (forward latency, interleaved). Runs on every rank of
a started process group."""
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from galaxy.comm.context import ParallelContext
from galaxy.comm.overlap import simplest_first
from galaxy.models.registry import build_backbone
from galaxy.pipeline import StageLinks
from galaxy.plan import build_plan
from galaxy.planner.check import check, from_rank0
from galaxy.planner.profile import measure_bandwidth, measure_blocks, slow_down
from galaxy.planner.split import (even_galaxy, even_pipeline, plan_galaxy, plan_pipeline,
                                  predict_layer_seconds, tiled_variants)


def plan_dims(cfg, batch):
    """The model sizes the planner's cost model takes, from a config."""
    return dict(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"], intermediate=cfg["intermediate_size"],
                seq=cfg["seq_length"], layers=cfg["num_hidden_layers"], batch=batch)


def gather_profiles(cfg, world, batch, memory_bytes=float("inf"), repeats=5):
    """Every rank's block profile at `batch` (each block timed `repeats` times) and the link
    bandwidth, the same on every rank."""
    mine = measure_blocks(cfg.replace(data=dataclasses.replace(cfg.data, batch_size=batch)), memory_bytes, repeats)
    profiles = [None] * world
    dist.all_gather_object(profiles, mine)
    # at the size of the layout's own messages (one rank's share of an activation): small messages
    # reach a lower rate than large ones, so a larger probe would overrate the link
    return profiles, measure_bandwidth(batch * cfg["seq_length"] * cfg["hidden_size"] * 4 // world)


def profile_and_plan(cfg, world, memory_bytes=float("inf"), column_unit=1, stages=1, repeats=5):
    """Gather every rank's profile (each block timed `repeats` times); every rank then computes the
    same plan (over `stages` pipeline stages of world / stages tensor ranks). Returns (split keys,
    predicted seconds, even split keys, its predicted seconds, profiles, bandwidth)."""
    microbatches = cfg["num_microbatches"] if stages > 1 else 1
    batch = cfg["batch_size"] // microbatches  # a stage runs one micro-batch at a time
    profiles, bandwidth = gather_profiles(cfg, world, batch, memory_bytes, repeats)
    dims = plan_dims(cfg, batch)
    if stages > 1:
        pipe = dict(dims, microbatches=microbatches, bandwidth_Bps=bandwidth)
        split, predicted = plan_pipeline(profiles, stages, column_unit=column_unit, **pipe)
        even, even_predicted = even_pipeline(profiles, stages, **pipe)
    else:
        split, predicted = plan_galaxy(profiles, bandwidth_Bps=bandwidth, column_unit=column_unit, **dims)
        even = even_galaxy(world, heads=dims["heads"], intermediate=dims["intermediate"], seq=dims["seq"])
        even_predicted = dims["layers"] * predict_layer_seconds(even, profiles, batch, dims["hidden"], bandwidth)
    return split, predicted, even, even_predicted, profiles, bandwidth


def _model(cfg, split, rank, world):
    cfg = cfg.with_layout(**split)
    return build_backbone(cfg, ParallelContext.create(build_plan(cfg, world), rank)).eval()


def _forward(model, ids, microbatches):
    """One forward of the encoder; in a pipeline, the forward phase of the GPipe schedule training uses:
    each micro-batch in turn, received from the previous stage and sent on to the next (sends do not
    wait, so stages overlap)."""
    if model.ctx.plan.pp_size == 1:
        return model(ids)
    links = StageLinks(model.ctx)
    for micro in ids.chunk(microbatches):
        x = None
        if not model.ctx.is_first_stage:
            x = links.recv_forward([tuple(micro.shape) + (model.config.hidden_size,)], torch.float32)[0]
        out = model(micro, hidden_states=x)
        if not model.ctx.is_last_stage:
            links.send_forward([out])
    links.finish()


def forward_timer(cfg, splits, rank, world):
    """time_round(names): one forward of the encoder per named split (splits: name -> keys), in the
    order given, each timed between barriers; returns {name: seconds}. A pipeline runs cfg's
    num_microbatches micro-batches through its stages."""
    models = {name: _model(cfg, split, rank, world) for name, split in splits.items()}
    ids = torch.randint(5, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]),
                        generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def time_round(names):
        seconds = {}
        for name in names:
            dist.barrier()
            start = time.perf_counter()
            _forward(models[name], ids, cfg["num_microbatches"])
            dist.barrier()
            seconds[name] = time.perf_counter() - start
        return seconds
    return time_round


def measure_forward(cfg, splits, rank, world, repeats=3):
    """Median forward seconds of the encoder per split (name -> keys) over `repeats` interleaved
    rounds after a warm-up one."""
    time_round = forward_timer(cfg, splits, rank, world)
    rounds = [time_round(list(splits)) for _ in range(repeats + 1)][1:]
    return {name: statistics.median(r[name] for r in rounds) for name in splits}


def plan_and_check(rank, world, cfg, args):
    """One rank of `python -m galaxy.planner` (module-level so spawned ranks can import it):
    optional slow-down, profile, plan, then check the even split against the planned one with each
    of --tiles (galaxy.planner.check, at most --repeats rounds)."""
    memory = args.memory_mb[rank] * 2**20 if args.memory_mb else float("inf")
    with slow_down(rank, {args.slow_rank}, factor=args.slow_factor):  # no rank is slowed without --slow_rank
        split, predicted, even, even_predicted, profiles, bandwidth = profile_and_plan(cfg, world, memory,
                                                                                       args.column_unit, args.stages)
        # the plan is only as good as the profile (noisy on shared cores), so what is kept is what the
        # check picks, the even split included; simplest first: even, then fewer tiles
        variants = {"even": even, **tiled_variants(split, simplest_first(args.tiles))}
        verdict = check(list(variants), forward_timer(cfg, variants, rank, world), max_rounds=args.repeats,
                        agree=from_rank0)
    return dict(split=split, predicted=predicted, even=even, even_predicted=even_predicted,
                profiles=[vars(p) for p in profiles], bandwidth=bandwidth, measured=verdict.medians(),
                rounds={name: len(ts) for name, ts in verdict.times.items()}, decided=verdict.decided,
                best=verdict.best, chosen=variants[verdict.best])
