"""benchmarks.netem.ranks_over: a benchmark's function on ranks in their own namespaces behind shaped
links (root) or on loopback, joined in one process group, each rank's return value back."""
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from benchmarks.netem import ranks_over

TARGET = "tests.benchmarks.test_netem_call:summed"


def summed(rank, world, offset):
    """Every rank's rank + offset, summed over the group, and the group's size."""
    total = torch.tensor([rank + offset], dtype=torch.float64)
    dist.all_reduce(total)
    return rank, float(total), dist.get_world_size()


def test_on_loopback_every_rank_returns():
    with ranks_over(None, 2) as (call, shaping):
        assert shaping == "loopback"
        assert call(TARGET, 2, (10,), 60) == [(0, 21.0, 2), (1, 21.0, 2)]


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="network namespaces and tc need root and iproute2")
def test_in_namespaces_every_rank_or_the_first_few_return():
    with ranks_over("1gbit", 3, prefix="gxtst") as (call, shaping):
        assert "rate 1gbit" in shaping
        assert call(TARGET, 3, (1,), 60) == [(0, 6.0, 3), (1, 6.0, 3), (2, 6.0, 3)]
        assert call(TARGET, 2, (0,), 60) == [(0, 1.0, 2), (1, 1.0, 2)]  # the first two namespaces
