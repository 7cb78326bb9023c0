"""Configs in parts: "include" composes model, layout, tuning and training parts; the shipped
recipes (the prototype's paths) plan at any world their sizes divide, with even splits."""
import json

import pytest

from galaxy.app import cli
from galaxy.config.load import idle_keys, load_config, read_config
from galaxy.data.build import check_training_data
from galaxy.errors import ConfigError
from galaxy.models.registry import MODELS
from galaxy.plan import build_plan
from tests.helpers import ROOT

UNEVEN = ROOT / "train_config" / "bert" / "galaxy" / "uneven.json"  # the one recipe with world-2 lists
RECIPES = sorted(p for arch in ("bert", "llama", "bart") for p in (ROOT / "train_config" / arch).rglob("*.json")
                 if p != UNEVEN)
LISTS = ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list")


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_parts_compose_in_order_and_the_file_wins(tmp_path):
    write(tmp_path / "model/m.json", {"model": "bart", "hidden_size": 64, "num_attention_heads": 2, "pad_size": 32})
    write(tmp_path / "layout/l.json", {"parallel": "galaxy", "hidden_size": 32})
    run = write(tmp_path / "runs/x/run.json", {"include": ["../../model/m.json", "../../layout/l.json"],
                                               "seq_length": 16})
    raw = read_config(run)
    assert raw == {"model": "bart", "hidden_size": 32, "num_attention_heads": 2, "seq_length": 16, "parallel": "galaxy"}
    cfg = load_config(run, {"hidden_size": 48})  # the command line wins over every part
    assert (cfg["hidden_size"], cfg["seq_length"], cfg["layer_norm_eps"]) == (48, 16, 1e-5)


def test_missing_and_circular_parts_are_named(tmp_path):
    with pytest.raises(ConfigError, match="includes nope.json, but there is no .*nope.json nor .*train_config/nope.json"):
        read_config(write(tmp_path / "a.json", {"include": ["nope.json"]}))
    write(tmp_path / "b.json", {"include": ["c.json"]})
    write(tmp_path / "c.json", {"include": ["b.json"]})
    with pytest.raises(ConfigError, match=r"include each other in a cycle: .*b\.json -> .*c\.json -> .*b\.json$"):
        read_config(tmp_path / "b.json")
    with pytest.raises(ConfigError, match=r"e\.json includes itself \(.*e\.json -> .*e\.json\)"):
        read_config(write(tmp_path / "e.json", {"include": ["e.json"]}))
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size'"):
        read_config(write(tmp_path / "d.json", {"include": [], "hiden_size": 1}))


@pytest.mark.parametrize("path", RECIPES + [UNEVEN], ids=lambda p: str(p.relative_to(ROOT / "train_config")))
def test_a_copied_recipe_reads_as_the_shipped_one(path, tmp_path):
    """Parts not beside the copy come from train_config/; a part put beside it wins."""
    copy = write(tmp_path / "runs" / "x" / "my.json", json.loads(path.read_text()))
    assert read_config(copy) == read_config(path)
    if path.relative_to(ROOT / "train_config").as_posix() == "bert/galaxy/full.json":
        tp = (ROOT / "train_config" / "layout" / "tp.json").read_text()
        (tmp_path / "layout").mkdir()
        (tmp_path / "layout" / "galaxy.json").write_text(tp)  # the copy's ../../layout/galaxy.json, beside it
        assert read_config(copy) == read_config(ROOT / "train_config" / "bert" / "tp" / "full.json")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "train_config")))
def test_shipped_recipes_split_evenly_at_any_world_that_divides(path):
    cfg = load_config(path)
    if path.parent.name in ("tp", "sp", "galaxy", "galaxy2"):  # layouts with no world-2 lists
        assert not any(cfg[key] for key in LISTS), path
    for world in (1, 2, 4):
        plan = build_plan(cfg, world)
        assert plan.world == world and len(set(plan.heads)) == 1 and len(set(plan.positions)) == 1


def test_the_uneven_example_plans_its_lists_at_world_2():
    plan = build_plan(load_config(UNEVEN), 2)
    assert (plan.heads, plan.columns, plan.positions) == ((3, 1), (768, 256), (80, 48))


@pytest.mark.parametrize("path", sorted((ROOT / "train_config").rglob("*.json")),
                         ids=lambda p: str(p.relative_to(ROOT / "train_config")))
def test_every_shipped_config_passes_the_command_line_checks(path, capsys):
    """Parts and recipes alike: no error; a recipe's only warnings are for its layout keys at world 1
    (the serial reference), a part's for keys another part completes."""
    recipe = path.parent.name not in ("model", "training", "layout", "tuning")
    for world in (1, 2):
        _, cfg, plan, _, _ = cli.parse("", str(path), ["--world", str(world), "--rank", "0"])
        if recipe:
            cli.check(check_training_data, cfg)
            cli.check(MODELS[cfg["model"]].check, cfg, plan)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("galaxy: warning:")]
        if recipe:
            assert all(line.endswith("world 1 runs the serial model, whatever the layout") for line in warnings) \
                and (world == 1 or not warnings), warnings


def test_keys_that_do_nothing_are_named():
    cfg = load_config(None, {"use_adapter": True, "lora_dim": 4, "lora_dropout": 0.1, "parallel": "tp",
                             "seq_scatter_list": [64, 64], "num_microbatches": 2, "keep_checkpoints": 2})
    assert idle_keys(cfg, build_plan(cfg, 2)) == [
        "config keys lora_dim 4, lora_dropout 0.1 have no effect: the tuning method is use_adapter",
        "config key seq_scatter_list [64, 64] has no effect: no block splits sequence positions (ATT=TP CON=NONE MLP=TP)",
        "config key num_microbatches 2 has no effect: there are no pipeline stages (stage_num_hidden_layers_list)",
        "config key keep_checkpoints 2 has no effect: save_every is 0: no training checkpoints are written"]
    serial = idle_keys(cfg, build_plan(cfg, 1))
    assert serial[1] == ("config keys seq_scatter_list [64, 64], num_microbatches 2 have no effect: world 1 runs the "
                         "serial model, whatever the layout"), serial
    assert idle_keys(load_config(None, {"use_lora": True, "lora_dim": 4}), build_plan(load_config(None), 1)) == []


def test_overlap_tiles_is_a_count_or_tile_sizes():
    assert load_config(None, {"overlap_tiles": [1, 7]})["overlap_tiles"] == [1, 7]
    assert load_config(None, {"overlap_tiles": 4}).model.overlap_tiles == 4  # the model's copy follows
    for bad in (0, [], [1, 0]):
        with pytest.raises(ConfigError, match="'overlap_tiles' must be >= 1 or a list of tile sizes >= 1"):
            load_config(None, {"overlap_tiles": bad})
    for wrong in ("2", [1.5, 2], True):
        with pytest.raises(ConfigError, match="'overlap_tiles' must be"):
            load_config(None, {"overlap_tiles": wrong})
