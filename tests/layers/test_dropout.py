"""Dropout masks as randomness, which parity with serial cannot check (serial shares the masks):
masks of different sites, steps, samples and seeds are independent, each drops about p,
neighbouring elements are independent, a shard's mask is its slice of the whole, and a
micro-batch's mask is its samples' rows of the whole step's; two forwards of the same samples
(retrieval's questions and passages) draw the two halves of one batch twice the step's."""
import pytest
import torch
from torch import nn

from galaxy.layers.dropout import LayoutInvariantDropout, set_dropout_seed, set_part

SHAPE = (4, 64, 256)  # 65536 elements: agreement rates within 0.01 of their expectation
SITES = (0, 1, 5, "layers.0.attn.q")


def masks(p, seed, step, rows=None, samples=None):
    """{site: dropped elements} of each site's mask over a tensor of SHAPE."""
    model = nn.ModuleList(LayoutInvariantDropout(p, site) for site in SITES).train()
    set_dropout_seed(model, seed, step, rows, samples)
    return {d.site: d(torch.ones(SHAPE)) == 0 for d in model}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_of_other_sites_steps_and_seeds_are_independent(p):
    independent = p**2 + (1 - p) ** 2  # how often two independent masks agree on an element
    base = masks(p, seed=42, step=0)
    later_samples = masks(p, 42, step=0, rows=range(SHAPE[0], 2 * SHAPE[0]), samples=2 * SHAPE[0])
    others = [masks(p, 42, step=1), later_samples, masks(p, 43, step=0)]
    drawn = list(base.values()) + [m[0] for m in others]
    for m in drawn:
        assert abs(m.float().mean().item() - p) < 0.01
    for i, a in enumerate(drawn):
        for b in drawn[i + 1:]:
            assert abs((a == b).float().mean().item() - independent) < 0.01


def test_neighbouring_elements_are_independent():
    p = 0.5
    m = masks(p, seed=42, step=3)[1]
    for dim in range(3):
        n = m.shape[dim]
        agree = (m.narrow(dim, 0, n - 1) == m.narrow(dim, 1, n - 1)).float().mean().item()
        assert abs(agree - (p**2 + (1 - p) ** 2)) < 0.01, dim


def test_a_shard_draws_its_slice_of_the_whole_mask():
    d = LayoutInvariantDropout(0.3, site=2).train()
    set_dropout_seed(d, 42, step=0)
    whole = d(torch.ones(SHAPE))
    index = (slice(None), slice(10, 50), slice(100, 180))
    part = d(torch.ones(SHAPE[0], 40, 80), SHAPE, index)
    assert torch.equal(part, whole[index])


def test_a_micro_batch_draws_its_samples_rows_of_the_step():
    d = LayoutInvariantDropout(0.3, site=2).train()
    set_dropout_seed(d, 42, step=0)
    whole = d(torch.ones(SHAPE))
    for rows in (range(0, 1), range(1, 3), range(3, 4)):  # any replica, micro-step or pipeline micro-batch
        set_dropout_seed(d, 42, step=0, rows=rows, samples=SHAPE[0])
        index = (slice(None), slice(10, 50))
        part = d(torch.ones(len(rows), 40, SHAPE[2]), (len(rows),) + SHAPE[1:], index)
        assert torch.equal(part, whole[rows.start:rows.stop, 10:50])


def test_two_forwards_of_the_same_samples_draw_the_halves_of_one_batch():
    d = LayoutInvariantDropout(0.3, site=2).train()
    set_dropout_seed(d, 42, step=0, rows=range(SHAPE[0], 2 * SHAPE[0]), samples=2 * SHAPE[0])
    second_half = d(torch.ones(SHAPE))
    for rows in (None, range(0, SHAPE[0])):  # keyed by the loop or not: the batch is the step's samples
        set_dropout_seed(d, 42, step=0, rows=rows, samples=SHAPE[0] if rows else None)
        with set_part(d, 1, 2):
            assert torch.equal(d(torch.ones(SHAPE)), second_half)
    assert d.part == (0, 1)  # the part holds inside the block only
