"""One typed record per parameter: which slice of which full tensor it holds and how its gradient
is reduced. Layers set it as they build (`set_spec`, the only writer); gradient sync, clipping,
checkpoints, initialisation, tied copies and tuning read it (`spec_of`). Unmarked: ParamSpec()."""
from dataclasses import dataclass, replace
from enum import Enum


class GradSum(Enum):
    """Over which ranks a parameter's gradient is summed after backward (galaxy.train.grad_sync)."""
    REPLICAS = "replicas"  # each tensor rank computes its whole gradient: summed over data-parallel replicas
    STAGE = "stage"  # replicated over the tensor group, each rank computes one term (it saw only its
    #                  positions, or is a bias one rank adds): summed over tensor x data ranks
    TIED = "tied"  # a pipeline's last-stage copy of a first-stage weight (tied embeddings): summed over
    #                replicas, then with the original's (galaxy.pipeline.engine.TiedCopies)


@dataclass(frozen=True)
class Shard:
    """The slice [start, start + length) along `dim` of a full tensor that has `full` entries there."""
    dim: int
    start: int
    length: int
    full: int


@dataclass(frozen=True)
class ParamSpec:
    shard: Shard | None = None  # None: it holds the whole tensor
    grad_sum: GradSum = GradSum.REPLICAS
    used_here: bool = True  # False: a row-parallel bias another rank adds; its gradient here stays 0
    init_name: str | None = None  # a tied copy's original: initialised, loaded and saved under that name
    has_tied_copy: bool = False  # a first-stage weight the last pipeline stage holds a GradSum.TIED copy of


def spec_of(param):
    return getattr(param, "galaxy_spec", ParamSpec())


def set_spec(*params, **fields):
    """Replace `fields` (ParamSpec's) in the record of each parameter (None, an absent bias, is skipped)."""
    for p in (p for p in params if p is not None):
        p.galaxy_spec = replace(spec_of(p), **fields)


def split_dim(t):
    """The dimension along which `t`'s full tensor is split over ranks (its ParamSpec), -1 if none."""
    return spec_of(t).shard.dim if spec_of(t).shard else -1


def span(t, dim):
    """The rows along `dim` of its full tensor that `t` holds (none if t is absent or on meta)."""
    if t is None or t.is_meta or dim < 0:
        return (0, 0)
    shard = spec_of(t).shard
    return (shard.start, shard.start + shard.length) if shard and shard.dim == dim else (0, t.shape[dim])
