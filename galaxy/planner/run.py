"""Profile every rank, plan the Galaxy splits (and the stage layers of a pipeline), and measure
the planned layout against the even split (forward latency, interleaved). Runs on every rank of
a started process group."""
import statistics
import time

import torch
import torch.distributed as dist

from galaxy.comm.context import ParallelContext
from galaxy.models.registry import build_backbone
from galaxy.pipeline import StageLinks
from galaxy.plan import build_plan
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
    mine = measure_blocks(dict(cfg, batch_size=batch), memory_bytes, repeats)
    profiles = [None] * world
    dist.all_gather_object(profiles, mine)
    # at the size of the layout's own messages (one rank's share of an activation): small messages
    # reach a lower rate than large ones, so a larger probe would overrate the link
    bandwidth = measure_bandwidth(batch * cfg["seq_length"] * cfg["hidden_size"] * 4 // world)
    return profiles, bandwidth


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
        return split, predicted, even, even_predicted, profiles, bandwidth
    split, predicted = plan_galaxy(profiles, bandwidth_Bps=bandwidth, column_unit=column_unit, **dims)
    even = even_galaxy(world, heads=dims["heads"], intermediate=dims["intermediate"], seq=dims["seq"])
    even_predicted = dims["layers"] * predict_layer_seconds(even, profiles, dims["batch"], dims["hidden"], bandwidth)
    return split, predicted, even, even_predicted, profiles, bandwidth


def _model(cfg, split, rank, world):
    cfg = dict(cfg, **split)
    return build_backbone(cfg, ParallelContext.create(build_plan(cfg, world), rank)).eval()


def _pipeline_forward(model, links, ids, microbatches):
    """The forward phase of the GPipe schedule training uses: each micro-batch in turn, received
    from the previous stage and sent on to the next (sends do not wait, so stages overlap)."""
    for micro in ids.chunk(microbatches):
        x = None
        if not model.ctx.is_first_stage:
            x = links.recv_forward([tuple(micro.shape) + (model.config.hidden_size,)], torch.float32)[0]
        out = model(micro, hidden_states=x)
        if not model.ctx.is_last_stage:
            links.send_forward([out])
    links.finish()


def _forward(model, ids, microbatches):
    if model.ctx.plan.pp_size == 1:
        return model(ids)
    return _pipeline_forward(model, StageLinks(model.ctx), ids, microbatches)


@torch.no_grad()
def measure_forward(cfg, splits, rank, world, repeats=3):
    """Median forward seconds of the encoder per split (name -> keys), timed interleaved between
    barriers; a pipeline runs cfg's num_microbatches micro-batches through its stages."""
    models = {name: _model(cfg, split, rank, world) for name, split in splits.items()}
    ids = torch.randint(5, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]),
                        generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            _forward(model, ids, cfg["num_microbatches"])
            dist.barrier()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plan_and_check(rank, world, cfg, args):
    """One rank of `python -m galaxy.planner` (module-level so spawned ranks can import it):
    optional slow-down, profile, plan, then measure the planned and the even split."""
    memory = args.memory_mb[rank] * 2**20 if args.memory_mb else float("inf")
    with slow_down(rank, {args.slow_rank}, factor=args.slow_factor):  # no rank is slowed without --slow_rank
        split, predicted, even, even_predicted, profiles, bandwidth = profile_and_plan(cfg, world, memory,
                                                                                       args.column_unit, args.stages)
        variants = {"even": even, **tiled_variants(split, args.tiles)}
        measured = measure_forward(cfg, variants, rank, world, args.repeats)
    # the plan is only as good as the profile (noisy on shared cores), so what is kept is the
    # fastest measured candidate, the even split included
    best = min(variants, key=measured.get)
    return dict(split=split, predicted=predicted, even=even, even_predicted=even_predicted,
                profiles=[vars(p) for p in profiles], bandwidth=bandwidth, measured=measured, best=best,
                chosen=variants[best])

