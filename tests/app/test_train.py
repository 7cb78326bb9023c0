"""pretrain_galaxy.py end to end: local spawn, metrics file, a copied config, the default split of a world
that does not divide the model, and errors before any rendezvous."""
import json

from galaxy.runtime.launch import free_port
from tests.helpers import ROOT, run_script

TINY = ["--hidden_size", "32", "--num_attention_heads", "4", "--intermediate_size", "64",
        "--num_hidden_layers", "2", "--batch_size", "4", "--seq_length", "32", "--log_every", "1"]


def run(*args, timeout=240):
    return run_script("pretrain_galaxy.py", *args, timeout=timeout)


def test_galaxy_config_spawns_two_ranks_and_writes_metrics_once(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = run("--config_file", "train_config/bert/galaxy/full.json", "--world", "2", "--max_steps", "2",
              "--master_port", str(free_port()),
              "--metrics_file", str(metrics), "--tp_num_attention_heads_list", "[3,1]",
              "--tp_intermediate_size_list", "[40,24]", "--seq_scatter_list", "[20,12]", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert {"step", "loss", "lr", "tokens_per_s", "step_time_s"} <= lines[0].keys()


def test_a_copied_config_runs_from_anywhere(tmp_path):
    """cp train_config/bert/full.json my.json; --config_file my.json: its parts come from train_config/."""
    copy = tmp_path / "my.json"
    copy.write_text((ROOT / "train_config" / "bert" / "full.json").read_text())
    metrics = tmp_path / "m.jsonl"
    out = run("--config_file", str(copy), "--max_steps", "2", "--metrics_file", str(metrics), *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_world_3_splits_4_heads_2_1_1_and_trains_as_serial(tmp_path):
    """4 heads, 64 columns and 32 positions do not divide over 3 ranks: the most even split, said at
    start-up, and the losses of the serial run (dropout on)."""
    losses = {}
    for world in (1, 3):
        metrics = tmp_path / f"world{world}.jsonl"
        out = run("--config_file", "train_config/bert/galaxy/full.json", "--world", str(world), "--max_steps", "2",
                  "--master_port", str(free_port()), "--metrics_file", str(metrics), *TINY)
        assert out.returncode == 0, out.stderr[-3000:]
        losses[world] = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert "tp_num_attention_heads_list [2, 1, 1], the most even split" in out.stdout, out.stdout
    assert "tp_intermediate_size_list [22, 21, 21]" in out.stdout and "seq_scatter_list [11, 11, 10]" in out.stdout
    assert len(losses[3]) == 2
    for got, want in zip(losses[3], losses[1], strict=True):
        assert abs(got - want) / abs(want) < 1e-5, losses


def test_bad_key_and_bad_split_stop_before_rendezvous():
    # --rank 0 of 2 with no peer would wait for rank 1; validation must fail first
    out = run("--config_file", "train_config/bert/galaxy/full.json", "--world", "2", "--rank", "0",
              "--tp_num_attention_heads_list", "[3,2]", timeout=60)
    assert out.returncode == 2 and "tp_num_attention_heads_list [3, 2] sums to 5, model has 4" in out.stderr
    out = run("--config_file", "train_config/bert/full.json", "--hiden_size", "3", timeout=60)
    assert out.returncode == 2 and "--hiden_size" in out.stderr
    out = run("--config_file", "train_config/bert/nope.json", timeout=60)
    assert out.returncode == 2 and "nope.json does not exist" in out.stderr
