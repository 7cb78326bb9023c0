"""`python -m galaxy.planner` end to end on a pipeline: 2 stages of one rank each, the second slowed;
bad arguments named before any rank starts."""
import json
import re

import pytest

from galaxy.config.load import load_config, read_config
from galaxy.plan import build_plan
from tests.helpers import ROOT, run_script

# pp/full.json (4 layers, hidden 256) with micro-batches of 8 x 128 tokens: blocks of about 20 ms
SMALL = dict(num_microbatches=2, vocab_size=1000)


def test_planner_gives_the_slowed_stage_fewer_layers_and_writes_a_loadable_config(tmp_path):
    """The plan gives the slowed stage fewer layers; --out writes the candidate its check picked
    (here among the plan with 1 or 2 overlap tiles and the even split; with one rank per stage
    nothing is tiled: this checks the path, not a gain)."""
    config, written = tmp_path / "pp.json", tmp_path / "planned.json"
    raw = read_config(ROOT / "train_config/bert/pp/full.json")
    config.write_text(json.dumps(dict(raw, **SMALL)))
    # 8x slower (each torch call of rank 1 takes 8x its time, however loaded the cores are); the plan
    # gives it fewer layers once it is about 1.4x slower
    out = run_script("-m", "galaxy.planner", "--config", str(config), "--world", "2", "--slow_rank", "1",
                     "--slow_factor", "8", "--tiles", "1", "2", "--repeats", "3", "--timeout_s", "120",
                     "--out", str(written))
    assert out.returncode == 0, out.stderr[-3000:]
    planned = re.search(r"^planned .*stage layers \[(\d+), (\d+)\]", out.stdout, re.M)
    assert planned and int(planned[2]) < int(planned[1]), out.stdout
    assert "measured planned, 2 tile(s)" in out.stdout and "measured even" in out.stdout, out.stdout
    fastest = re.search(r"^kept: (.*) \(", out.stdout, re.M)[1]
    cfg = load_config(str(written), {})
    assert build_plan(cfg, 2).pp_size == 2
    if fastest != "even":
        assert cfg["overlap_tiles"] == int(fastest.split(", ")[1][0])
        assert cfg["stage_num_hidden_layers_list"] == [int(planned[1]), int(planned[2])]
    else:
        assert cfg["stage_num_hidden_layers_list"] == [2, 2]


@pytest.mark.parametrize("args, message", [
    (["--world", "1"], "--world 1: the planner splits a model over at least 2 ranks"),
    (["--world", "2", "--memory_mb", "1", "1"], "--memory_mb [1.0, 1.0] sums to 2 MB; the layers' parameters need 12.0 MB"),
    (["--world", "2", "--memory_mb", "100", "0.5"], "--memory_mb 0.5 cannot hold one head and one intermediate column"),
])
def test_planner_names_bad_arguments(args, message):
    done = run_script("-m", "galaxy.planner", "--config", "train_config/bert/galaxy/full.json", *args, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-3000:]
