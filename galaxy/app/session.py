"""What every entry's ranks share before they run anything: join the process group's groups for
the plan, check that every rank was started with the same config, and build this rank's part of
the model from the run's sources (load_checkpoint, the tuning method, load_trainable)."""
import torch
import torch.distributed as dist

from galaxy.comm.context import ParallelContext
from galaxy.config.load import config_hash
from galaxy.models.registry import build_model
from galaxy.runtime import launch
from galaxy.tuning.apply import load_sources


def check_same_config(cfg, ctx):
    """Ranks started with different configs would deadlock or diverge: stop them now,
    naming the keys that differ from rank 0's."""
    if ctx.world == 1:
        return
    digests = [None] * ctx.world
    dist.all_gather_object(digests, config_hash(cfg))
    if len(set(digests)) == 1:
        return
    configs = [None] * ctx.world
    dist.all_gather_object(configs, cfg)
    diffs = [f"rank {r}: {k}={configs[r][k]!r} (rank 0: {configs[0][k]!r})"
             for r in range(1, ctx.world) for k in sorted(cfg) if configs[r][k] != configs[0][k]]
    raise SystemExit(f"galaxy: rank {ctx.rank}: ranks were started with different configs: {'; '.join(diffs)}")


def join(cfg, plan, rank):
    """This rank's ParallelContext, once every rank is known to run the same config; seeds torch."""
    ctx = ParallelContext.create(plan, rank, cfg["device"], cfg["distributed_backend"] or launch.default_backend())
    check_same_config(cfg, ctx)
    torch.manual_seed(cfg["seed"])
    return ctx


def load_model(cfg, ctx, rank):
    """This rank's part of the model with load_checkpoint's weights and the tuning method (and
    load_trainable's weights) applied; returns (model, a line describing the tuning)."""
    model = build_model(cfg, ctx)
    skipped, tuning = load_sources(model, cfg, ctx)
    if skipped and rank == 0:  # every rank found the same: the whole model's names were checked
        strict = "" if cfg["strict"] else "--strict false: "  # (a bare encoder's missing head is named too)
        print(f"[rank 0] {strict}{cfg['load_checkpoint']}: " + "; ".join(skipped), flush=True)
    return model, tuning
