"""galaxy.profiler.emulate: a rank computes at its stated throughput, moves bytes at the host's
speed, is not stretched while it waits, and sleeps rather than holds a core."""
import re
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.testing._internal.distributed.fake_pg import FakeStore

from galaxy.planner.profile import block_flops, measure_blocks, profile_gflops
from galaxy.profiler.emulate import Throughput, _HostClock, check_gflops
from galaxy.profiler.flops import get_model_profile
from galaxy.app import cli
from tests.helpers import run_script

TARGET = 5.0  # GFLOP/s: well below a host core (~30 in a single-threaded matmul), as the benchmarks run


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_matmuls_take_their_flops_over_the_throughput_and_sleep_meanwhile():
    # 3 calls of ~215 ms each: a sleep's late wake-up (milliseconds on a loaded host, as CI's two workers
    # make it) is a small part of a call (10 calls of 27 ms measured 4.15 GFLOP/s there)
    x, w = torch.randn(1024, 512), torch.randn(1024, 512)
    flops = 3 * 2 * 1024 * 512 * 1024
    with Throughput(TARGET) as device:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(3):
            F.linear(x, w)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert device.flops == flops
    assert flops / wall / 1e9 == pytest.approx(TARGET, rel=0.1)
    assert device.measured_gflops() == pytest.approx(TARGET, rel=0.1)
    assert cpu < 0.5 * wall  # the rest of each call was slept, not spun


def test_autograds_backward_is_stretched_too_and_nothing_twice():
    # forward x @ w.T, backward dx and dw: three products of one size; a Galaxy tile's own backward
    # (a custom autograd Function's matmuls, galaxy.comm.overlap) runs through the same engine
    x, w = torch.randn(1024, 512, requires_grad=True), torch.randn(1024, 512, requires_grad=True)
    product = 2 * 1024 * 512 * 1024  # ~215 ms at TARGET: a late wake-up on a loaded host is a small part
    F.linear(x, w).sum().backward()  # autograd's first backward in a process pays its set-up (~25 ms)
    with Throughput(TARGET) as device:
        out = F.linear(x, w)
        start = time.perf_counter()
        out.backward(torch.ones_like(out))
        backward = time.perf_counter() - start
    assert device.flops == 3 * product  # the forward's linear once, the backward's two mm
    assert 2 * product / backward / 1e9 == pytest.approx(TARGET, rel=0.1)


def test_calls_that_only_move_bytes_keep_the_hosts_speed():
    x = torch.randn(2048, 2048)  # 16 MB
    start = time.perf_counter()
    plain = [x.clone(), torch.cat([x, x]), x[:, 1:].contiguous()]
    host = time.perf_counter() - start
    with Throughput(0.001) as device:  # 1 MFLOP/s: one add of x would take over an hour
        start = time.perf_counter()
        copies = [x.clone(), torch.cat([x, x]), x[:, 1:].contiguous(), x.view(-1), x.transpose(0, 1)]
        emulated = time.perf_counter() - start
    assert device.flops == 0 and emulated < 5 * host + 0.5
    assert all(torch.equal(a, b) for a, b in zip(plain, copies[:3], strict=True))


def test_time_blocked_is_not_host_time():
    clock = _HostClock()
    start = clock()
    time.sleep(0.3)  # as a call blocked on a peer's collective
    assert clock() - start < 0.05
    clock.close()


def test_a_changed_throughput_applies_from_the_next_call():
    x, w = torch.randn(64, 256), torch.randn(256, 256)
    flops = 5 * 2 * 64 * 256 * 256
    with Throughput(1.0) as device:
        device.set(0.25)  # 4x slower
        start = time.perf_counter()
        for _ in range(5):
            F.linear(x, w)
        assert flops / (time.perf_counter() - start) / 1e9 == pytest.approx(0.25, rel=0.1)
    with pytest.raises(ValueError, match="above 0"):
        device.set(0)


def test_counts_are_those_of_the_flops_profiler():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64))
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        counted = get_model_profile(model, (x,), print_profile=False, warm_up=0)[0]
        with Throughput(100.0) as device:
            model(x)
    assert device.flops == counted


def test_the_planners_profile_shows_the_emulated_throughput_per_block():
    cfg = dict(model="bert", hidden_size=256, num_attention_heads=4, intermediate_size=1024, vocab_size=100,
               seq_length=64, batch_size=1, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, max_position_embeddings=64, type_vocab_size=2,
               initializer_range=0.02)
    flops = block_flops(cfg)
    assert flops["mlp"] == 2 * 64 * 256 * 1024 * 2 + 64 * (1024 + 256) + 8 * 64 * 1024  # two linears + GELU
    with Throughput(1.0):  # blocks of 40-70 ms: the emulation keeps time to about a millisecond
        profile = measure_blocks(cfg, repeats=2)
    gflops = profile_gflops(profile, flops, cfg)
    assert gflops["layer"] == pytest.approx(1.0, rel=0.1)
    assert gflops["mlp"] == pytest.approx(1.0, rel=0.1) and gflops["attention"] == pytest.approx(1.0, rel=0.1)


def test_bad_throughputs_name_the_flag():
    with pytest.raises(ValueError, match=r"--device_gflops \[4.0\]: 1 throughputs for 2 ranks"):
        check_gflops([4.0], 2)
    with pytest.raises(ValueError, match="above 0"):
        check_gflops([4.0, -1.0], 2)


def test_a_dtensor_call_counts_this_ranks_shard():
    """Rank 0 of 2 on torch's fake process group (no peers needed: a column-parallel forward sends nothing)."""
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        model = parallelize_module(nn.Linear(32, 64), init_device_mesh("cpu", (2,)), ColwiseParallel())
        with torch.no_grad(), Throughput(1000.0) as device:
            model(torch.randn(8, 32))
    finally:
        dist.destroy_process_group()
    assert device.flops == (2 * 8 * 32 + 8) * 32  # half of the 64 columns, with their bias


def test_infer_script_emulates_devices_and_replans_when_one_slows():
    """--device_gflops / --device_gflops_after: rank 1 slows 5x after request 3; live re-planning
    moves work off it. Tiny BERT (its vocabulary small: the MLM head is replicated)."""
    out = run_script("infer_galaxy.py", "--config_file", "train_config/bert/galaxy/full.json", "--world", "2",
                     "--hidden_size", "64", "--num_hidden_layers", "2", "--seq_length", "32", "--vocab_size", "1000",
                     "--timeout_s", "60", "--requests", "8", "--warmup", "1", "--device_gflops", "0.2,0.2",
                     "--device_gflops_after", "3:0.2,0.04", "--replan", '{"patience": 2, "warmup": 1}')
    assert out.returncode == 0, out.stderr[-3000:]
    assert "emulated devices: [0.2, 0.2] GFLOP/s per rank; after request 3: [0.2, 0.04]" in out.stdout
    assert "after request 3: emulated devices now [0.2, 0.04] GFLOP/s per rank" in out.stdout
    move = re.search(r"replan after step (\d+): heads \[2, 2\] -> \[(\d+), (\d+)\]", out.stdout)
    assert move and int(move[1]) > 3 and int(move[3]) < int(move[2]), out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--device_gflops", "40"], "--device_gflops [40.0]: 1 throughputs for 2 ranks"),
    (["--device_gflops", "40,0"], "a throughput is a number of GFLOP/s above 0"),
    (["--device_gflops", "40,x"], "argument --device_gflops: '40,x': expected GFLOP/s per rank"),
    (["--device_gflops_after", "3:4,4"], "--device_gflops_after changes the throughputs --device_gflops sets"),
    (["--device_gflops", "4,4", "--device_gflops_after", "0:4,4"], "expected STEP:GFLOPS,... with STEP >= 1"),
    (["--device_gflops", "4,4", "--device_gflops_after", "3:4"], "--device_gflops_after 3: [4.0]: 1 throughputs"),
])
def test_bad_device_flags_stop_before_processes_start(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:  # the entries' parse: nothing has started yet
        cli.parse("pretrain", "train_config/bert/galaxy/full.json", ["--world", "2", *argv], cli.add_device_args)
    assert stop.value.code == 2 and message in capsys.readouterr().err
