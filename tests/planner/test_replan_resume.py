"""--replan through pretrain_galaxy.py: a world-2 run whose rank 1 turns 6 times slower at step 3
(a test hook) moves work to rank 0 and goes on saving checkpoints in the new split. The run
restarted from the first checkpoint after the move, with the same command line (its split lists
the ones before the move), reads it into that split and trains on exactly as the first run did,
and as serial does."""
import json
import re
import shutil

from tests import procs

STEPS = 8
SPLIT = ["--parallel", "galaxy", "--num_attention_heads", "4", "--tp_num_attention_heads_list", "[1,3]",
         "--tp_intermediate_size_list", "[48,80]", "--seq_scatter_list", "[14,18]"]
TRAIN = ["--max_steps", str(STEPS), "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0"]
ARGS = [*SPLIT, *TRAIN, "--world", "2", "--replan", '{"threshold": 0.25, "patience": 2, "warmup": 1}', "--save_every", "1"]


def test_checkpoint_after_a_move_resumes_in_the_original_split_exactly(tmp_path):
    args = [*ARGS, "--save_dir", str(tmp_path / "ckpt")]
    run = procs.start([*args, "--metrics_file", str(tmp_path / "moved.jsonl")], tmp_path / "run.log",
                      "tests/scripts/patched_steps.py", env={"GALAXY_TEST_SLOW": "1,3,6"})
    code = procs.finish({0: run}, 240)[0]
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-3000:]
    # a move changes heads, columns or positions, whichever the measured times ask for (CI once moved columns
    # and positions only)
    moves = re.findall(r"replan after step (\d+): (.*) \(predicted", log)
    assert moves and int(moves[0][0]) < STEPS, log[-3000:]
    moved_after = int(moves[0][0])
    changes = re.findall(r"(heads|columns|positions) (\[\d+, \d+\]) -> (\[\d+, \d+\])", moves[0][1])
    assert changes, moves[0]
    assert all(json.loads(new)[0] > json.loads(old)[0] for _, old, new in changes), moves[0]  # work went to rank 0
    # the checkpoint of step s is written before the move decided after step s: the next one is the first in
    # the new split; the later ones go, so that the restart resumes from it
    saved = moved_after + 1
    manifest = json.loads((tmp_path / "ckpt" / f"step-{saved:08d}" / "manifest.json").read_text())
    for name, _, new in changes:
        assert f"{name}={new}" in manifest["plan"], manifest["plan"]
    for later in range(saved + 1, STEPS + 1):
        shutil.rmtree(tmp_path / "ckpt" / f"step-{later:08d}")
    code, out = procs.run([*args, "--resume", "true", "--metrics_file", str(tmp_path / "resumed.jsonl")])
    assert code == 0 and f"resumed from step {saved}" in out, out[-3000:]
    assert "heads=[1, 3] columns=[48, 80] positions=[14, 18]" in out, out[-3000:]  # read into the split before the move
    code, out = procs.run([*TRAIN, "--num_attention_heads", "4", "--metrics_file", str(tmp_path / "serial.jsonl")])
    assert code == 0, out[-3000:]
    moved, resumed, serial = (procs.losses(tmp_path / f"{name}.jsonl") for name in ("moved", "resumed", "serial"))
    assert sorted(resumed) == list(range(saved + 1, STEPS + 1)), resumed
    for step in range(1, STEPS + 1):
        assert abs(moved[step] - serial[step]) / serial[step] < 1e-5, (step, moved, serial)
    for step in resumed:
        assert abs(resumed[step] - moved[step]) / moved[step] < 1e-5, (step, resumed, moved)
