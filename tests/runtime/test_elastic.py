"""--elastic: a rank of a world-3 local spawn SIGKILLed mid-run (by a test hook, after step 5 of 6;
the last checkpoint is step 4's) leaves 2 survivors that re-plan their splits, resume from that
checkpoint and finish; their losses equal serial's, whether the lost rank is rank 1 or rank 0 (the
host of the ranks' store). Inference: Galaxy's survivors re-plan in place (outputs checked in
test_elastic_infer.py), a pipeline's restart. What cannot go on is refused by name."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from galaxy.config.load import load_config
from galaxy.errors import ConfigError
from galaxy.plan import build_plan
from galaxy.runtime import elastic, health, launch
from tests.helpers import ROOT
from tests import procs

STEPS = ["--max_steps", "6", "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0"]


@pytest.mark.parametrize("lost, plan", [(1, "heads=[3, 1] columns=[86, 42] positions=[18, 14]"),
                                        (0, "heads=[2, 2] columns=[64, 64] positions=[16, 16]")])
def test_killed_rank_survivors_resume_at_world2_and_match_serial(lost, plan, tmp_path):
    args = [*procs.GALAXY3, *STEPS, "--world", "3", "--elastic", "--save_dir", str(tmp_path / "ckpt"),
            "--save_every", "2", "--metrics_file", str(tmp_path / "elastic.jsonl")]
    run = procs.start(args, tmp_path / "run.log", "tests/scripts/patched_steps.py",
                      env={"GALAXY_TEST_KILL": f"{lost},5,3"})
    code = procs.finish({0: run}, 240)[0]
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-3000:]
    assert f"galaxy: rank {lost} was killed by SIGKILL; restart 1 of 3: the 2 survivors" in log, log[-3000:]
    assert "step-00000004" in log and plan in log, log[-3000:]
    assert "resumed from step 4" in log and "step 6/6 |" in log, log[-3000:]
    code, out = procs.run([*STEPS, "--num_attention_heads", "4", "--metrics_file", str(tmp_path / "serial.jsonl")])
    assert code == 0, out[-3000:]
    got, serial = procs.losses(tmp_path / "elastic.jsonl"), procs.losses(tmp_path / "serial.jsonl")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - serial[step]) / serial[step] < 1e-5, (step, got, serial)


@pytest.mark.slow  # a whole spawn to see one refusal: ~25 s
def test_no_checkpoint_yet_is_refused(tmp_path):
    args = [*procs.GALAXY3, *STEPS, "--world", "3", "--elastic", "--save_dir", str(tmp_path / "ckpt"),
            "--save_every", "4"]
    run = procs.start(args, tmp_path / "run.log", "tests/scripts/patched_steps.py",
                      env={"GALAXY_TEST_KILL": "2,1,3"})
    code = procs.finish({0: run}, 240)[0]
    log = (tmp_path / "run.log").read_text()
    assert code == 1, log[-3000:]
    assert "no complete checkpoint in save_dir" in log and "died before the first save" in log, log[-3000:]


def plan_of(world, **over):
    cfg = load_config(None, {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "seq_length": 32,
                             "num_hidden_layers": 4, **over})
    return cfg, build_plan(cfg, world)


def test_survivors_keep_their_shares():
    cfg, plan = plan_of(3, parallel="galaxy", tp_num_attention_heads_list=[2, 1, 1],
                        tp_intermediate_size_list=[64, 32, 32], seq_scatter_list=[12, 10, 10])
    new_cfg, new = elastic.survivors_plan(cfg, plan, [0])
    assert (new.heads, new.columns, new.positions) == ((2, 2), (64, 64), (16, 16))
    cfg, plan = plan_of(3, stage_num_hidden_layers_list=[2, 1, 1])
    assert elastic.survivors_plan(cfg, plan, [2])[1].stage_layers == (3, 1)
    cfg, plan = plan_of(3, parallel="dp", batch_size=6, zero_stage=1, memory_mb=[100, 200, 300])
    new_cfg, new = elastic.survivors_plan(cfg, plan, [1])
    assert new.dp_size == 2 and new_cfg["memory_mb"] == [100, 300]


@pytest.mark.parametrize("over, message", [
    ({"parallel": "galaxy", "data_parallel_size": 2}, "this plan splits tensor x data ways"),
    ({"parallel": "dp", "zero_stage": 1}, "there is no data-parallel group"),
])
def test_what_cannot_shrink_is_refused(over, message):
    cfg, plan = plan_of(4 if "data_parallel_size" in over else 2, **over, elastic=True)
    with pytest.raises(ConfigError, match=message):
        elastic.check(cfg, plan, None, resumes=False)


@pytest.mark.parametrize("layout, expected", [
    (procs.GALAXY3[2:], ["galaxy: rank 2 was killed by SIGKILL; regroup 1 of 3: the 2 survivors re-plan in place",
                         "[rank 0] elastic: lost rank(s) [2] during request 3; the 2 survivors re-planned in place",
                         "[rank 0] plan: ATT=TP CON=SP MLP=TP tp=2"]),
    # a pipeline's stages hold different layers: its survivors restart, as training does
    (["--parallel", "serial", "--stage_num_hidden_layers_list", "[1,1,1]", "--num_hidden_layers", "3"],
     ["galaxy: rank 2 was killed by SIGKILL; restart 1 of 3: the 2 survivors", "[rank 0] plan: ",
      "pp=2 heads=[4] columns=[128] positions=[32] stage_layers=[2, 1]"]),
], ids=["galaxy in place", "pipeline restarts"])
def test_inference_killed_rank_survivors_serve_at_world2(layout, expected):
    args = ["--config_file", "train_config/bert/galaxy/full.json", "--world", "3", "--elastic",
            "--hidden_size", "64", "--intermediate_size", "128", "--vocab_size", "200", "--num_hidden_layers", "2",
            "--seq_length", "32", "--timeout_s", "20", "--requests", "4", "--warmup", "1", *layout]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GALAXY_TEST_KILL": "2,3,3"}
    done = subprocess.run([sys.executable, "tests/scripts/patched_infer.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for line in expected:
        assert line in log, (line, log[-3000:])
    assert "latency over 4 requests" in log, log[-3000:]


def test_sequence_parallel_survivors_split_positions_only():
    cfg, plan = plan_of(4, parallel="sp", num_attention_heads=2, seq_scatter_list=[8, 8, 8, 8])
    new_cfg, new = elastic.survivors_plan(cfg, plan, [3])
    assert new.positions == (11, 11, 10) and new_cfg["tp_num_attention_heads_list"] is None


def test_a_rank_lost_before_every_rank_joined_fails_the_start():
    """Inference in place: the launcher names a lost rank only once every rank has joined; before,
    the others wait in the rendezvous, not in a collective, so the run fails at once (as without
    --elastic) instead of after their timeout_s."""
    announcer = launch._LossAnnouncer(f"tcp://127.0.0.1:{launch.free_port()}", 5, regroups=3)
    procs = [SimpleNamespace(exitcode=code) for code in (None, -9, None)]
    announcer.check(procs, {}, {})
    assert announcer.generation == 0 and not announcer.lost
    for rank in range(3):
        announcer.store.set(health._key("joined", rank), "1")
    announcer.check(procs, {}, {})
    assert announcer.generation == 1 and announcer.lost == {1: -9}
