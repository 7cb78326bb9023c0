"""Time of each gloo collective over an emulated link (benchmarks.netem) vs its ring-volume
prediction, for one BERT activation [1, T, 768] fp32 at world 2: are gloo's algorithms ring-efficient?
"galaxy ..." are galaxy.comm.collectives' versions (on gloo: direct exchanges, receives posted first).
Then how much slower compute runs while a collective is in flight: the CPU cost overlap pays here.

    sudo python -m benchmarks.link_collectives --rate 100mbit --seq 512
"""
import argparse
import statistics
import sys
import time

from benchmarks.netem import EdgeNet, add_worker_args, rate_bits

PORT = 29541


def worker(args):
    import torch
    import torch.distributed as dist

    from galaxy.comm import collectives as C
    from galaxy.runtime.launch import init_distributed
    torch.set_num_threads(1)  # both ranks share this machine's cores (the library no longer sets it)
    init_distributed(2, args.rank, f"tcp://{args.master_addr}:{PORT}", "gloo", timeout_s=600)
    full = torch.randn(1, args.seq, 768)
    half = full[:, : args.seq // 2].contiguous()
    split = [args.seq // 2] * 2
    ops = {  # name: (call, ring bytes sent per rank)
        "all_reduce": (lambda: dist.all_reduce(full.clone()), full.nbytes),
        "reduce_scatter": (lambda: dist.reduce_scatter(torch.empty_like(half), list(full.split(split, 1))),
                           full.nbytes / 2),
        "galaxy reduce_scatter": (lambda: C.start_reduce_scatter(full, 1, split, dist.group.WORLD).wait(), full.nbytes / 2),
        "all_gather": (lambda: dist.all_gather_single(torch.empty(2 * half.numel()), half.flatten()), half.nbytes),
        "galaxy all_gather": (lambda: C.start_all_gather(half, 1, split, dist.group.WORLD).wait(), half.nbytes),
    }
    for name, (call, nbytes) in ops.items():
        times = []
        for _ in range(args.repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        slowest = torch.tensor(times[1:])  # per round, the slower rank's time
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if args.rank == 0:
            m = statistics.median(slowest.tolist())
            ideal = nbytes * 8 / rate_bits(args.rate)
            print(f"{name:20s} {m * 1e3:8.1f} ms   ring volume {nbytes / 2**20:5.2f} MiB -> {ideal * 1e3:7.1f} ms "
                  f"at {args.rate}   ({m / ideal:.2f}x)", flush=True)
    compute_tax(args)
    dist.destroy_process_group()


def compute_tax(args):
    """What overlap can win: a tile-sized linear, timed alone and while an all-gather travels. The
    emulated link's packets are processed by the same 2 cores (veth + tc, no NIC offload)."""
    import torch
    import torch.distributed as dist

    from galaxy.comm import collectives as C
    x, w = torch.randn(args.seq // 4, 768), torch.randn(2304, 768)  # a quarter of the sequence, q|k|v
    shard = torch.zeros(1, int(rate_bits(args.rate) / 8 / 4), 1)  # 1 s of link per rank: outlasts the linears

    def linears():
        start = time.perf_counter()
        for _ in range(40):
            torch.nn.functional.linear(x, w)
        return time.perf_counter() - start

    alone, during = [], []
    for _ in range(args.repeats):
        dist.barrier()
        alone.append(linears())
        dist.barrier()
        pending = C.start_all_gather(shard, 1, [shard.shape[1]] * 2, dist.group.WORLD)
        during.append(linears())
        pending.wait()
    if args.rank == 0:
        a, d = statistics.median(alone), statistics.median(during)
        print(f"40 linears [{args.seq // 4}, 768] x [768, 2304]: {a * 1e3:.0f} ms alone, {d * 1e3:.0f} ms while an "
              f"all-gather is in flight ({d / a:.2f}x)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=9)
    add_worker_args(p)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with EdgeNet(args.rate) as net:
        print(net.shaping)
        argv = [sys.executable, "-m", "benchmarks.link_collectives", "--worker", "--master_addr", net.addr[0],
                "--rate", args.rate, "--seq", str(args.seq), "--repeats", str(args.repeats)]
        net.run_ranks(argv, 600)


if __name__ == "__main__":
    main()
