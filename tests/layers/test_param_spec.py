"""The per-parameter record, the block-method enum and the placement table, without processes."""
import pytest
import torch

from galaxy.comm import collectives as C
from galaxy.errors import ConfigError
from galaxy.layers.linear import ColumnLinear, RowLinear
from galaxy.layers.param_spec import GradSum, ParamSpec, Shard, set_spec, spec_of
from galaxy.layers.placement import PARTIAL, REPLICATE, SEQ, TABLE
from galaxy.plan import Method, build_plan

CFG = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 8, "seq_length": 6}


@pytest.mark.parametrize("text, method", [("TP", Method.TP), ("tp", Method.TP), ("SP", Method.SP),
                                          ("None", Method.NONE), ("NONE", Method.NONE)])
def test_prototype_method_strings_parse(text, method):
    plan = build_plan({**CFG, "att_parallel_method": text, "con_parallel_method": "SP"}, 2)
    assert plan.att is method and plan.con is Method.SP and plan.seq_sharded
    assert f"ATT={method.value} " in plan.describe()


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match=r"con_parallel_method 'TP' is not one of \['SP', 'NONE'\]"):
        build_plan({**CFG, "con_parallel_method": "TP"}, 2)


def test_linears_record_their_shard_and_bias():
    col = ColumnLinear(4, range(2, 5), 8)
    assert spec_of(col.weight).shard == spec_of(col.bias).shard == Shard(0, 2, 3, 8)
    row = RowLinear(range(3, 8), 8, 4, owns_bias=False)
    assert spec_of(row.weight).shard == Shard(1, 3, 5, 8)
    assert spec_of(row.bias) == ParamSpec(grad_sum=GradSum.STAGE, used_here=False)
    whole = RowLinear(range(8), 8, 4)
    assert spec_of(whole.bias) == ParamSpec()  # not split: nothing to sum over the tensor group


def test_set_spec_keeps_other_fields_and_skips_absent_biases():
    p = torch.nn.Parameter(torch.zeros(2))
    set_spec(p, None, shard=Shard(0, 0, 2, 4))
    set_spec(p, grad_sum=GradSum.TIED, init_name="x")
    assert spec_of(p) == ParamSpec(shard=Shard(0, 0, 2, 4), grad_sum=GradSum.TIED, init_name="x")


def test_placement_table_holds_the_collectives():
    assert TABLE[PARTIAL, Method.TP] == (C.all_reduce, C.copy_to_all)
    assert TABLE[SEQ, Method.NONE] == (C.gather_along_dim,) and TABLE[REPLICATE, Method.NONE] == ()
    assert {op.__name__ for ops in TABLE.values() for op in ops} <= set(C.CONJUGATES)
