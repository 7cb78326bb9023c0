"""The one description of who holds which rows and who wants them (galaxy.comm.rows), and its
two transports: point to point between live ranks (world 3, uneven and overlapping holders) and
slices read from safetensors files; each rank's rows equal the full tensor's, cut by hand."""
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from galaxy.comm.rows import Rows, pieces, read_rows, send_rows
from tests.helpers import run_ranks, seeded

FULL = (2, 10, 3)  # split along dimension 1
CASES = {  # name: (held by rank, wanted by rank)
    "shards to another split": (((0, 4), (4, 7), (7, 10)), ((6, 10), (0, 3), (2, 8))),
    "a whole copy, a shard and nothing": (((0, 10), (2, 5), (0, 0)), ((2, 5), (0, 10), (4, 9))),
}


def test_pieces_prefer_the_wanting_holder_then_the_first():
    assert pieces([(0, 4), (4, 8)], 2, 6) == [(0, 2, 4), (1, 4, 6)]
    assert pieces([(0, 8), (0, 8)], 2, 6, own=1) == [(1, 2, 6)]
    assert pieces([(0, 10), (3, 5)], 0, 10, own=1) == [(0, 0, 3), (1, 3, 5), (0, 5, 10)]
    assert pieces([(0, 2), (4, 8)], 0, 8) == [(0, 0, 2), (1, 4, 8)]  # rows 2-3: nobody's


def _send(rank, world, held, wanted):
    full = seeded(*FULL)
    x = full[:, held[rank][0]:held[rank][1]].clone() if held[rank] != (0, 0) else None
    lo, hi = wanted[rank]
    out = torch.full((FULL[0], hi - lo, FULL[2]), float("nan"))
    counts = send_rows(out, x, Rows(1, held, wanted), rank, dist.group.WORLD)
    return out, counts


@pytest.mark.parametrize("case", CASES)
def test_send_rows_gives_each_rank_its_wanted_rows(case):
    held, wanted = CASES[case]
    full = seeded(*FULL)
    for rank, (out, (kept, received)) in enumerate(run_ranks(_send, 3, held, wanted)):
        lo, hi = wanted[rank]
        assert torch.equal(out, full[:, lo:hi]), (case, rank)
        own = max(0, min(hi, held[rank][1]) - max(lo, held[rank][0]))
        assert (kept, received) == (own, hi - lo - own), (case, rank)


def test_read_rows_reads_across_files_and_names_a_missing_row(tmp_path):
    full = seeded(*FULL)
    held = [(0, 4), (4, 10)]
    for i, (lo, hi) in enumerate(held):
        save_file({"w": full[:, lo:hi].contiguous()}, str(tmp_path / f"{i}.safetensors"))
    handles = [safe_open(str(tmp_path / f"{i}.safetensors"), "pt") for i in range(2)]
    view = lambda h: handles[h].get_slice("w")  # noqa: E731
    assert torch.equal(read_rows(view, held, 1, 2, 9), full[:, 2:9])
    assert torch.equal(read_rows(view, held, None, 0, 0), full[:, :4])  # dim None: the first holder's whole tensor
    with pytest.raises(LookupError, match="4"):
        read_rows(view, [(0, 4), (8, 10)], 1, 2, 9)
