"""Initial weights as randomness, which parity with serial cannot check (serial shares them): no
two weight matrices of a 32-layer LLaMA are equal, the run's seed changes them, and the same seed
gives the same weights in every layout (each rank's shard is its slice of serial's tensors)."""
import itertools

import torch

from galaxy.comm.context import ParallelContext
from galaxy.config.load import load_config
from galaxy.models.checkpoint import own_slice
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM
from galaxy.plan import build_plan
from tests.helpers import run_ranks

SMALL = dict(model="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
             num_hidden_layers=2, vocab_size=100, seq_length=24)
UNEVEN = dict(tp_num_attention_heads_list=[6, 2], tp_intermediate_size_list=[64, 32], seq_scatter_list=[14, 10])


def llama(ctx=None, **over):
    """A LLaMA built as the entry scripts build it: from the run's config, --seed included."""
    return LlamaForCausalLM(LlamaConfig.from_dict(load_config(None, {**SMALL, **over})), ctx)


def matrices(model):
    return {name: p.detach() for name, p in model.named_parameters() if p.dim() == 2}


def test_no_two_weight_matrices_of_a_32_layer_llama_are_equal():
    weights = matrices(llama(num_hidden_layers=32))
    equal = [(a, b) for a, b in itertools.combinations(weights, 2)
             if weights[a].shape == weights[b].shape and torch.equal(weights[a], weights[b])]
    assert not equal, f"{len(equal)} pairs of equal matrices, e.g. {equal[:3]}"


def test_the_seed_changes_every_weight_matrix_and_only_the_seed_does():
    one, again, two = (matrices(llama(seed=s)) for s in (1, 1, 2))
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert not [n for n in one if torch.equal(one[n], two[n])]


def _shards_differing_from_serial(rank, world, layout):
    cfg = {**UNEVEN, "parallel": layout, "seed": 7}
    model = llama(ParallelContext.create(build_plan(load_config(None, {**SMALL, **cfg}), world), rank), **cfg)
    serial = dict(llama(seed=7).named_parameters())
    return [name for name, p in model.named_parameters() if not torch.equal(p, own_slice(serial[name], p))]


def test_the_same_seed_gives_the_same_weights_in_every_layout():
    for layout in ("tp", "galaxy"):
        assert run_ranks(_shards_differing_from_serial, 2, layout) == [[], []], layout
