"""The research prototype's commands keep working (here with --explain: the plan, no training)."""
import pytest

from tests.helpers import run_script


@pytest.mark.parametrize("script, layout", [
    ("pretrain_bert.py", "ATT=NONE"), ("pretrain_tp_bert.py", "ATT=TP CON=NONE MLP=TP"),
    ("pretrain_sp_bert.py", "ATT=SP CON=SP MLP=SP"), ("pretrain_dp_bert.py", "dp=2"),
    ("pretrain_pp_bert.py", "pp=2"), ("pretrain_galaxy.py", "ATT=TP CON=SP MLP=TP"),
    ("finetune_pp_llama.py", "pp=2"), ("profile_flpos.py", "bert"), ("profile_flops.py", "bart"),
])
def test_prototype_script_runs(script, layout):
    profiling = script.startswith("profile")
    args = ["--model", layout, "--config", f"train_config/{layout}/full.json", "--depth", "1"] if profiling \
        else ["--world", "2", "--rank", "0", "--explain"]
    out = run_script(script, *args, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert profiling or layout in out.stdout
