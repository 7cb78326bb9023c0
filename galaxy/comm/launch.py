"""Starting ranks: one terminal per rank (--world N --rank R), torchrun's environment,
or `--world N` alone, which spawns all N ranks on this machine from one command.

The same `spawn` runs the multi-rank tests: every rank gets a timeout, a rank's exception
is reported with its rank number, and the parent never waits forever.
"""
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from galaxy.comm import health

DEFAULT_ADDR, DEFAULT_PORT = "127.0.0.1", 29500


def add_launch_args(parser):
    group = parser.add_argument_group("launch")
    group.add_argument("--world", type=int, default=None, help="number of ranks (default: torchrun's or 1)")
    group.add_argument("--rank", type=int, default=None, help="this process's rank; omit to spawn all ranks here")
    group.add_argument("--master_addr", default=None, help=f"rendezvous address (default {DEFAULT_ADDR})")
    group.add_argument("--master_port", type=int, default=None, help=f"rendezvous port (default {DEFAULT_PORT})")
    group.add_argument("--backend", default=None, help="gloo | nccl (default: nccl on CUDA, else gloo)")
    group.add_argument("--timeout_s", type=float, default=None, help="collective timeout in seconds")


def resolve_world_rank(args):
    """CLI first, then torchrun's environment, then a single rank."""
    world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", 1))
    rank = args.rank if args.rank is not None else (int(os.environ["RANK"]) if "RANK" in os.environ else None)
    if world < 1:
        raise SystemExit(f"--world {world} must be at least 1")
    if rank is not None and not 0 <= rank < world:
        raise SystemExit(f"--rank {rank} is outside 0..{world - 1} for --world {world}")
    return world, rank


def init_method_from(args, cfg_init_method=None):
    """--master_addr/--master_port, else torchrun's MASTER_ADDR/PORT, else the config's init_method."""
    if args.master_addr or args.master_port or cfg_init_method is None:
        addr = args.master_addr or os.environ.get("MASTER_ADDR", DEFAULT_ADDR)
        port = args.master_port or int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
        return f"tcp://{addr}:{port}"
    return cfg_init_method


def default_backend():
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(world, rank, init_method, backend=None, timeout_s=300.0):
    """Join the process group; returns the Rendezvous (None for one rank) that names lost peers.

    A tcp:// rendezvous goes through our own store so that ranks that never joined are named,
    and a port already taken by another program is reported as such.
    """
    if world == 1:
        return None
    backend = backend or default_backend()
    if backend == "gloo":
        torch.set_num_threads(1)  # ranks share this machine's cores; more threads only contend
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    timeout = timedelta(seconds=timeout_s)
    if not init_method.startswith("tcp://"):  # env:// or file://: torch's own rendezvous
        dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank, timeout=timeout)
        return None
    rendezvous = health.Rendezvous(init_method, rank, world, timeout_s)
    rendezvous.join(timeout_s)
    dist.init_process_group(backend, store=rendezvous.store, world_size=world, rank=rank, timeout=timeout)
    return rendezvous


def call_reporting_peers(fn, rank, world, args, rendezvous):
    """fn(rank, world, *args), turning a collective that failed because a peer is gone into
    a PeerError naming that peer."""
    try:
        return fn(rank, world, *args)
    except Exception as e:
        if rendezvous is None or not health.is_comm_error(e):
            raise
        raise health.PeerError(rendezvous.explain(e)) from None
    finally:
        if rendezvous is not None:
            rendezvous.stop()


def free_port():
    with socket.socket() as s:
        s.bind((DEFAULT_ADDR, 0))
        return s.getsockname()[1]


def _worker(rank, world, init_method, backend, timeout_s, fn, args, results):
    try:
        rendezvous = init_distributed(world, rank, init_method, backend, timeout_s)
        # plain pickle: torch's queue would share tensors through memory that dies with this process
        results.put((rank, "ok", pickle.dumps(call_reporting_peers(fn, rank, world, args, rendezvous))))
    except BaseException as e:  # report every failure, including SystemExit, to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world, args=(), backend="gloo", timeout_s=120.0, init_method=None):
    """Run fn(rank, world, *args) on `world` local processes joined in a process group
    (on a free loopback port unless init_method is given).

    Returns the list of per-rank return values (must be picklable). Raises RuntimeError
    naming the failing ranks on any error, and kills every rank after timeout_s.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = init_method or f"tcp://{DEFAULT_ADDR}:{free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, world, init_method, backend, timeout_s, fn, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    outcome, errors = {}, {}
    deadline = time.monotonic() + timeout_s + 30
    try:
        while len(outcome) < world and not errors:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                _check_alive(procs, outcome, errors, deadline)
                continue
            (outcome if status == "ok" else errors)[rank] = value  # one failure is enough: peers would time out
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed: {errors[rank]}")
    return [pickle.loads(outcome[r]) for r in range(world)]


def _check_alive(procs, outcome, errors, deadline):
    """A rank that died without reporting (killed, or failed before it could) fails the run now."""
    for rank, p in enumerate(procs):
        if rank not in outcome and rank not in errors and p.exitcode not in (None, 0):
            errors[rank] = f"process exited with code {p.exitcode} before reporting a result"
    if not errors and time.monotonic() > deadline:
        missing = [r for r in range(len(procs)) if r not in outcome]
        raise RuntimeError(f"ranks {missing} gave no result before the timeout")


def run(main, world, rank, args=(), init_method=None, backend=None, timeout_s=300.0):
    """The entry scripts' launcher: main(rank, world, *args) runs with the process group joined,
    on this one rank, or on all ranks spawned here when no rank was given."""
    backend = backend or default_backend()
    if rank is None and world > 1:
        try:
            spawn(main, world, args, backend=backend, timeout_s=timeout_s, init_method=init_method)
        except RuntimeError as e:
            sys.exit(f"galaxy: {e}")
        return None
    rank = rank or 0
    try:
        rendezvous = init_distributed(world, rank, init_method, backend, timeout_s)
        return call_reporting_peers(main, rank, world, args, rendezvous)
    except health.PeerError as e:
        sys.exit(f"galaxy: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
