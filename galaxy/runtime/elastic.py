"""--elastic: when a rank of a one-command local spawn dies, its survivors go on without a human.

Training: the launcher (galaxy.runtime.launch.run) sees a rank's process end without a result
(killed by a signal, or exited non-zero), ends the others, and asks `Survivors` for the smaller
world, restarting them from the latest checkpoint. Inference in a layout whose ranks share every
layer (tp, sp, galaxy: `in_place`): the launcher tells the survivors instead, and they re-plan in
their own processes, keeping their weights (galaxy.app.infer.Server). Both re-plan the same way:

- the config loses the dead ranks' entries, and each per-rank list is apportioned again over the
  survivors by the planner's split policy (galaxy.planner.split), each one's speed taken from its
  own entries (twice the heads: twice as fast): tp_num_attention_heads_list /
  tp_intermediate_size_list / seq_scatter_list when the ranks share each layer,
  stage_num_hidden_layers_list when they are pipeline stages, memory_mb / zero_shard_list when
  they are data-parallel replicas;
- training resumes from the latest complete checkpoint in save_dir, read into the new layout
  (galaxy.train.checkpoint reshards it); inference in place keeps each survivor's rows, moves
  rows between survivors point to point and rebuilds only the lost rank's rows from the run's
  sources (galaxy.reshard.relayout); inference in a pipeline or data-parallel layout restarts like
  training, reloading load_checkpoint (or the seed's weights) and serving from the start.

Layouts whose ranks split more than one way (tensor x data, tensor x pipeline ...) and a world
too small for the layout (ZeRO without replicas, fewer heads than ranks ...) are refused, at
start-up for the loss of the last rank and with the reason when it happens.
"""
import dataclasses
import functools

from galaxy.errors import ConfigError
from galaxy.plan import Method, build_plan, gqa_group
from galaxy.planner.split import SPLIT_KEYS, RankProfile, apportion, split_layer
from galaxy.train import checkpoint
from galaxy.train.zero import check_zero


def _kept(values, dead):
    return [v for r, v in enumerate(values) if r not in dead]


def _seconds_per_unit(sizes, dead, world):
    """The survivors' seconds per unit as their old `sizes` imply: a rank that held twice the share
    is twice as fast (even when there were none)."""
    return [1 / w for w in (_kept(sizes, dead) if sizes else [1] * world)]


def survivors_config(cfg, plan, dead):
    """The config for the ranks left when global ranks `dead` are gone (they keep their order)."""
    world = plan.world - len(dead)
    split = [name for name, size in (("tensor", plan.tp_size), ("data", plan.dp_size), ("pipeline", plan.pp_size))
             if size > 1]
    if len(split) > 1:  # then a list index is not the global rank, and a lost rank leaves a hole in a grid
        raise ConfigError(f"--elastic re-plans layouts whose ranks split one way (tensor, data or pipeline); "
                          f"this plan splits {' x '.join(split)} ways ({plan.describe()})")
    if plan.virtual_stages > 1:
        raise ConfigError(f"--elastic does not re-plan interleaved pipelines (virtual_stages {plan.virtual_stages})")
    layout = {}
    if plan.tp_size > 1:
        layout = _tensor_lists(cfg, plan, dead, world)
    elif plan.pp_size > 1:
        costs = _seconds_per_unit(cfg.layout.stage_num_hidden_layers_list, dead, world)
        layout["stage_num_hidden_layers_list"] = apportion(cfg.model.num_hidden_layers, costs) if world > 1 else None
    elif cfg.layout.data_parallel_size:
        layout["data_parallel_size"] = world
    zero = _replica_lists(cfg, dead) if plan.dp_size > 1 else {}
    return cfg.replace(layout=dataclasses.replace(cfg.layout, **layout), zero=dataclasses.replace(cfg.zero, **zero))


def _tensor_lists(cfg, plan, dead, world):
    """The split lists the plan uses, over the surviving tensor ranks (the planner's split policy)."""
    totals = {key: cfg[total] for key, used, total in (
        ("tp_num_attention_heads_list", plan.att is Method.TP, "num_attention_heads"),
        ("tp_intermediate_size_list", plan.mlp is Method.TP, "intermediate_size"),
        ("seq_scatter_list", plan.seq_sharded, "seq_length")) if used}
    costs = [_seconds_per_unit(cfg[key] if key in totals else None, dead, world) for key in SPLIT_KEYS]
    profiles = [RankProfile(*rank) for rank in zip(*costs, strict=True)]
    return split_layer(profiles, totals, {SPLIT_KEYS[0]: gqa_group(cfg)})


def _replica_lists(cfg, dead):
    """memory_mb and zero_shard_list (renormalised) of the surviving data-parallel ranks."""
    lists = {"memory_mb": cfg.zero.memory_mb, "zero_shard_list": cfg.zero.zero_shard_list}
    out = {key: _kept(values, dead) for key, values in lists.items() if values is not None}
    if "zero_shard_list" in out:
        out["zero_shard_list"] = [f / sum(out["zero_shard_list"]) for f in out["zero_shard_list"]]
    return out


def survivors_plan(cfg, plan, dead):
    """(config, plan) for the survivors, checked as a config given on the command line would be."""
    cfg = survivors_config(cfg, plan, dead)
    new = build_plan(cfg, plan.world - len(dead))
    check_zero(cfg, new)
    return cfg, new


def go_on(cfg, plan, dead):
    """survivors_plan when ranks `dead` are lost mid-run; SystemExit saying why the survivors cannot."""
    try:
        return survivors_plan(cfg, plan, dead)
    except ConfigError as e:
        raise SystemExit(f"galaxy: --elastic: the {plan.world - len(dead)} surviving ranks cannot go on: {e}") from None


def check(cfg, plan, rank, resumes):
    """Before any process starts: --elastic needs a local spawn, a layout it can re-plan after
    losing a rank, and (training, `resumes`) checkpoints to go on from."""
    if not cfg.runtime.elastic:
        return
    if rank is not None or plan.world == 1:
        raise ConfigError("--elastic restarts the ranks of a one-command local spawn (--world N, no --rank); "
                          "under torchrun use its own --max-restarts (with --resume true)")
    if resumes and not cfg.checkpoint.save_every:
        raise ConfigError("--elastic resumes from the latest training checkpoint: set save_every (and save_dir)")
    try:
        survivors_plan(cfg, plan, [plan.world - 1])
    except ConfigError as e:
        raise ConfigError(f"--elastic: after losing a rank: {e}") from None


def survivors(resumes, dead, launch_args):
    """launch.run's `survivors(dead, launch_args)` once `resumes` is bound: launch_args is (cfg, plan, *rest)
    of the run that lost ranks `dead`; returns (world, launch_args, what the restart does) for the
    survivors, or raises SystemExit saying why they cannot go on."""
    cfg, plan, *rest = launch_args
    cfg, new = go_on(cfg, plan, dead)
    what = f"plan {new.describe()}"
    if resumes:
        save_dir = cfg.checkpoint.save_dir
        found = checkpoint.checkpoints(save_dir)
        if not found:
            raise SystemExit(f"galaxy: --elastic: no complete checkpoint in save_dir {save_dir} to resume "
                             f"the survivors from (rank(s) {dead} died before the first save)")
        cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
        what = f"resuming from {found[-1][1]}, {what}"
    return new.world, (cfg, new, *rest), what


def in_place(plan, resumes):
    """Whether survivors go on in their own processes: inference whose ranks share every layer."""
    return not resumes and plan.world > 1 and plan.tp_size == plan.world


def launch_args(cfg, plan, resumes):
    """launch.run's elastic arguments for this config (none without --elastic)."""
    if not cfg.runtime.elastic:
        return {}
    return {"survivors": functools.partial(survivors, resumes), "restarts": cfg.runtime.elastic_restarts,
            "in_place": in_place(plan, resumes)}
