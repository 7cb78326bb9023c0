"""`python -m galaxy.planner` end to end on a pipeline: 2 stages of one rank each, the second slowed."""
import json

from galaxy.plan import build_plan
from galaxy.train.config import load_config
from tests.helpers import ROOT, run_script

# pp/full.json (4 layers, hidden 256) with micro-batches of 8 x 128 tokens: its blocks take about
# 20 ms; a much shorter one sometimes runs through inside one scheduler slice of the slowed core,
# and the planner's fastest-of-repeats timing would then miss the slow-down
SMALL = dict(num_microbatches=2, vocab_size=1000)


def test_planner_gives_the_slowed_stage_fewer_layers_and_writes_a_loadable_config(tmp_path):
    """Also picks overlap_tiles among measured candidates (with one rank per stage nothing is tiled:
    this checks the path, not a gain)."""
    config, planned = tmp_path / "pp.json", tmp_path / "planned.json"
    raw = json.loads((ROOT / "train_config/bert/pp/full.json").read_text())
    config.write_text(json.dumps(dict(raw, **SMALL)))
    # 8x slower (1/8 of its core), so the stage stays clearly slower when other processes load the
    # fast rank's core too; the plan gives it fewer layers once it is about 1.4x slower
    out = run_script("-m", "galaxy.planner", "--config", str(config), "--world", "2", "--slow_rank", "1",
                     "--slow_factor", "8", "--tiles", "1", "2", "--repeats", "1", "--timeout_s", "120", "--out", str(planned))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage layers" in out.stdout and "measured" in out.stdout, out.stdout
    assert "measured planned, 2 tile(s)" in out.stdout, out.stdout
    cfg = load_config(str(planned), {})
    assert cfg["overlap_tiles"] in (1, 2)  # the faster of the two measured candidates
    plan = build_plan(cfg, 2)
    assert plan.pp_size == 2 and plan.stage_layers[1] < plan.stage_layers[0], (plan.describe(), out.stdout)
