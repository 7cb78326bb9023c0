"""galaxy/plan.py: a world that does not divide heads, columns or positions gets the most even
uneven split, in whole GQA groups, named at start-up (default_splits); listed sizes are kept."""
import pytest

from galaxy.config.load import load_config
from galaxy.errors import ConfigError
from galaxy.plan import build_plan, default_splits, even_split

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, seq_length=32,
            parallel="galaxy")


def test_even_split_gives_the_first_ranks_one_unit_more():
    assert even_split(4, 3) == [2, 1, 1]
    assert even_split(6, 3) == [2, 2, 2]
    assert even_split(8, 3, unit=2) == [4, 2, 2]
    assert even_split(2, 3) == [1, 1, 0]


def test_world_3_gets_the_most_even_split_and_says_so():
    cfg = load_config(None, TINY)
    plan = build_plan(cfg, 3)
    assert (plan.heads, plan.columns, plan.positions) == ((2, 1, 1), (22, 21, 21), (11, 11, 10))
    lines = default_splits(cfg, plan)
    assert len(lines) == 3 and "4 attention heads do not divide over 3 ranks: tp_num_attention_heads_list [2, 1, 1]" \
        in lines[0]
    listed = load_config(None, {**TINY, "tp_num_attention_heads_list": [1, 1, 2]})
    assert build_plan(listed, 3).heads == (1, 1, 2) and len(default_splits(listed, build_plan(listed, 3))) == 2
    assert default_splits(cfg, build_plan(cfg, 2)) == []  # even: nothing to say


def test_gqa_heads_split_in_whole_groups():
    cfg = load_config(None, {**TINY, "model": "llama", "num_attention_heads": 8, "num_key_value_heads": 4})
    plan = build_plan(cfg, 3)
    assert (plan.heads, plan.kv_heads) == ((4, 2, 2), (2, 1, 1))


def test_too_few_heads_for_the_ranks_is_named():
    with pytest.raises(ConfigError, match="is not given and 2 attention heads cannot give each of 3 ranks one"):
        build_plan(load_config(None, {**TINY, "num_attention_heads": 2}), 3)
    gqa = {**TINY, "model": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(ConfigError, match="cannot give each of 3 ranks a group of 2"):
        build_plan(load_config(None, gqa), 3)
