"""benchmarks/gpu.py without a GPU: it refuses to run (or to write GPU figures), and its whole
code path (Galaxy vs transformers, layouts at world 1, world 2 on gloo) runs on CPU at tiny shapes."""
import csv

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.main([])


def test_cpu_runs_never_write_gpu_results():
    with pytest.raises(SystemExit, match="full GPU runs only"):
        gpu.main(["--device", "cpu", "--tiny", "--out_dir", gpu.RESULTS])


def test_tiny_cpu_run_covers_every_part(tmp_path):
    pytest.importorskip("transformers")
    gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--out_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "gpu_cpu.csv")))
    assert {(r["part"], r["engine"]) for r in rows} >= {("llama-1.1b", "galaxy"), ("llama-1.1b", "transformers"),
                                                       ("bert-base", "galaxy"), ("bert-base", "transformers"),
                                                       ("bert-base pp", "galaxy"), ("llama-1.1b galaxy", "galaxy")}
    for r in rows:
        if r["world"] == "2":  # the layouts match serial up to bf16 autocast rounding
            assert float(r["max_loss_rel_diff_vs_serial"]) < 1e-3, r
    assert (tmp_path / "gpu_cpu.svg").read_text().startswith("<svg")
