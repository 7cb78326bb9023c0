"""pretrain_bart.py end to end: a Galaxy run on two spawned ranks, and refusals before rendezvous."""
import json

from galaxy.runtime.launch import free_port
from tests.helpers import run_script

TINY = ["--hidden_size", "32", "--num_attention_heads", "4", "--intermediate_size", "64", "--num_hidden_layers", "1",
        "--num_decoder_layers", "1", "--batch_size", "4", "--seq_length", "32", "--log_every", "1"]


def run(*args, timeout=240):
    return run_script("pretrain_bart.py", *args, timeout=timeout)


def test_galaxy_config_trains_on_two_ranks(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = run("--config_file", "train_config/bart/galaxy/full.json", "--world", "2", "--max_steps", "2",
              "--master_port", str(free_port()), "--metrics_file", str(metrics),
              "--tp_num_attention_heads_list", "[3,1]", "--tp_intermediate_size_list", "[40,24]",
              "--seq_scatter_list", "[20,12]", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 for m in lines)


def test_pipeline_and_other_models_are_refused_before_rendezvous():
    out = run("--config_file", "train_config/bart/full.json", "--world", "2", "--rank", "0",
              "--stage_num_hidden_layers_list", "[1,1]", timeout=60)
    assert out.returncode != 0 and "BART does not support pipeline parallelism" in out.stderr
    out = run("--config_file", "train_config/bart/full.json", "--use_side", "true", timeout=60)
    assert out.returncode != 0 and "BART's encoder-decoder is not supported" in out.stderr
    out = run("--config_file", "train_config/bert/full.json", timeout=60)
    assert out.returncode != 0 and "this script trains bart" in out.stderr
