"""Starting ranks: one terminal per rank (--world N --rank R), torchrun's environment,
or `--world N` alone, which spawns all N ranks on this machine from one command.

Where the ranks meet, first of: --master_addr/--master_port, the launcher's
MASTER_ADDR/MASTER_PORT (torchrun), the config's init_method, 127.0.0.1:29500. A local spawn
meets on a free port unless --master_port is given, so two runs of one config can share a machine.

The same `spawn` runs the multi-rank tests: every rank gets a timeout, a rank's exception
is reported with its rank number, and the parent waits at most limit_s when given one.
SIGTERM/SIGINT to a spawning launcher reach every rank it started.
"""
import contextlib
import json
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from galaxy.comm.context import local_gpu
from galaxy.runtime import health

DEFAULT_ADDR, DEFAULT_PORT = "127.0.0.1", 29500
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RANK_EXIT_S = 5  # how long ranks get to exit on their own once the run is decided
_POLL_S = 0.2  # how often spawn looks for ranks that ended without a result
RANKS_PER_CORE = 4  # the most a one-command local spawn starts on one CPU core


def add_launch_args(parser):
    group = parser.add_argument_group("launch")
    group.add_argument("--world", type=int, default=None, help="number of ranks (default: torchrun's or 1)")
    group.add_argument("--rank", type=int, default=None, help="this process's rank; omit to spawn all ranks here")
    group.add_argument("--master_addr", default=None,
                       help=f"rendezvous address (default: MASTER_ADDR, else the config's init_method, else "
                            f"{DEFAULT_ADDR})")
    group.add_argument("--master_port", type=int, default=None,
                       help=f"rendezvous port (default: MASTER_PORT, else the config's init_method (the shipped "
                            f"configs: 23000), else {DEFAULT_PORT}; a local spawn picks a free one)")
    group.add_argument("--backend", default=None, help="gloo | nccl (default: nccl on CUDA, else gloo)")
    group.add_argument("--timeout_s", type=float, default=None, help="collective timeout in seconds")
    group.add_argument("--threads", type=int, default=None,
                       help="torch threads per rank (default: 1 per rank under a local spawn, else torch's choice)")
    group.add_argument("--debug", action="store_true", help="print a failing rank's traceback, not only its cause")


def _env_int(name):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"galaxy: environment variable {name}={value!r} is not an integer") from None


def _first(*values):
    return next((v for v in values if v is not None), None)


def resolve_world_rank(args):
    """CLI first, then torchrun's environment, then a single rank; ValueError for a world or rank
    out of range (the command line rejects it)."""
    world = _first(args.world, _env_int("WORLD_SIZE"), 1)
    rank = _first(args.rank, _env_int("RANK"))
    if world < 1:
        raise ValueError(f"--world {world} must be at least 1")
    if rank is not None and not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is outside 0..{world - 1} for --world {world}")
    return world, rank


def cpu_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_local_spawn(world, cores):
    """A one-command local spawn of `world` ranks on `cores` CPU cores: ValueError past
    RANKS_PER_CORE ranks a core (they would crawl: every step waits for the slowest rank)."""
    if world > RANKS_PER_CORE * cores:
        raise ValueError(f"--world {world} would start {world} ranks on this machine's {cores} CPU core"
                         f"{'s' * (cores > 1)} ({world / cores:.0f} a core); a local spawn starts at most "
                         f"{RANKS_PER_CORE} ranks a core ({RANKS_PER_CORE * cores} here): give a smaller --world, or "
                         f"start the ranks on several machines with --rank")


def local_spawn_line(world, cores, threads):
    """What a local spawn says at start: how many ranks share how many cores."""
    line = (f"galaxy: starting {world} ranks here on {cores} CPU core{'s' * (cores > 1)}, {threads} torch "
            f"thread{'s' * (threads > 1)} each")
    if world * threads > cores:
        line += (f"; oversubscribed ({world * threads} threads on {cores} cores): every step waits for the slowest "
                 f"rank, so expect it slow")
    return line


def init_method_from(args, cfg_init_method=None, local_spawn=False):
    """The rendezvous URL in the order of the module docstring."""
    if local_spawn:  # the launcher's environment and the config's fixed port describe other runs
        return f"tcp://{args.master_addr or DEFAULT_ADDR}:{args.master_port or free_port()}"
    env_addr, env_port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT")
    given = _first(args.master_addr, args.master_port, env_addr, env_port) is not None
    if cfg_init_method and not cfg_init_method.startswith("tcp://") and not given:
        return cfg_init_method  # env:// or file://
    cfg = urlparse(cfg_init_method or "tcp://")
    addr = _first(args.master_addr, env_addr, cfg.hostname, DEFAULT_ADDR)
    return f"tcp://{addr}:{_first(args.master_port, env_port, cfg.port, DEFAULT_PORT)}"


def default_backend():
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(world, rank, init_method, backend=None, timeout_s=300.0, launcher_hosts_store=False):
    """Join the process group; returns the Rendezvous (None for one rank) that names lost peers.

    A tcp:// rendezvous goes through our own store so that ranks that never joined are named,
    and a port already taken by another program is reported as such. The store is rank 0's,
    or the launcher's (`launcher_hosts_store`: ranks that regroup after a loss).
    """
    if world == 1:
        return None
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_gpu(rank))
    timeout = timedelta(seconds=timeout_s)
    if not init_method.startswith("tcp://"):  # env:// or file://: torch's own rendezvous
        dist.init_process_group(backend, init_method=init_method, world_size=world, rank=rank, timeout=timeout)
        return None
    rendezvous = health.Rendezvous(init_method, rank, world, timeout_s, launcher_hosts_store)
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


class RankFailed(RuntimeError):
    """A rank failed: `cause` is one line, `details` its traceback (gloo's C++ frames included);
    `died` maps each rank whose process ended without a result to its exit code (-N: signal N)."""

    def __init__(self, rank, cause, details="", died=None):
        self.line, self.details, self.died = f"rank {rank} failed: {cause}", details, died or {}
        super().__init__(f"{self.line}\n{details}".rstrip())


def _deaths(died):
    """'rank 1 was killed by SIGKILL', 'rank 2 exited with code 3', ..."""
    return "; ".join(f"rank {r} {_death(code)}" for r, code in sorted(died.items()))


def _death(exit_code):
    """How a process ended: 'was killed by SIGKILL' (exit code -9), 'exited with code 3'."""
    return f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited with code {exit_code}"


def cause(error):
    """One line naming what went wrong (a SystemExit already carries its message)."""
    if isinstance(error, SystemExit):
        return str(error.code).removeprefix("galaxy: ")
    return f"{type(error).__name__}: {health.first_line(error)}"


class Stopped(Exception):
    """The launcher received SIGTERM or SIGINT."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise_stopped():
    """SIGTERM/SIGINT raise Stopped here, so that spawn's clean-up ends its ranks (by default
    the launcher would die alone and its ranks would train on as orphans)."""
    def stop(signum, frame):
        raise Stopped(signum)
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class SignalFlag:
    """For ranks that save on a signal: SIGTERM/SIGINT only raise this flag, and ranks stop
    at the first step boundary where `any_rank()` (an all-reduce: call it on every rank at
    every step) sees it raised on any rank."""

    def __init__(self):
        self.signum = 0
        for s in STOP_SIGNALS:
            signal.signal(s, lambda signum, frame: setattr(self, "signum", signum))

    def any_rank(self):
        """The signal number received by some rank, or 0."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _worker(rank, world, init_method, backend, timeout_s, threads, fn, args, results, launcher_hosts_store):
    torch.set_num_threads(threads)
    try:
        rendezvous = init_distributed(world, rank, init_method, backend, timeout_s, launcher_hosts_store)
        # plain pickle: torch's queue would share tensors through memory that dies with this process
        results.put((rank, "ok", pickle.dumps(call_reporting_peers(fn, rank, world, args, rendezvous))))
    except BaseException as e:  # report every failure, including SystemExit, to the parent
        results.put((rank, "error", (cause(e), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world, args=(), backend="gloo", timeout_s=120.0, init_method=None, limit_s=None, threads=1, regroups=0,
          start_method="spawn"):
    """Run fn(rank, world, *args) on `world` local processes joined in a process group
    (on a free loopback port unless init_method is given), each with `threads` torch threads
    (ranks share this machine's cores; more threads only contend).

    Returns the list of per-rank return values (must be picklable). Raises RankFailed naming
    the first failing rank, RuntimeError when limit_s passes first (every rank is killed).
    On Stopped (see signals_raise_stopped) each rank gets SIGTERM and timeout_s to finish
    (a rank that saves on a signal saves); a second signal kills at once.

    regroups > 0: this launcher hosts the ranks' store, and up to `regroups` times a rank whose
    process ends without a result is announced to the others (health.Rendezvous.regroup) instead
    of failing the run; a lost rank's return value is None.

    start_method "forkserver" forks ranks from a server process that imported what it was told to
    preload (tests: ~0.07 s a world-2 start instead of ~2 s); the ranks are then the server's
    children, not this process's, and see the environment the server started with.
    """
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    init_method = init_method or f"tcp://{DEFAULT_ADDR}:{free_port()}"
    announcer = _LossAnnouncer(init_method, timeout_s, regroups) if regroups else None
    lost = announcer.lost if announcer else {}  # ranks announced lost (their dict grows in place)
    procs = [ctx.Process(target=_worker, args=(r, world, init_method, backend, timeout_s, threads, fn, args, results,
                                               bool(regroups)), daemon=True) for r in range(world)]
    outcome, errors, reported, signum = {}, {}, set(), None
    deadline = None if limit_s is None else time.monotonic() + limit_s
    try:
        for p in procs:
            p.start()
        while len(outcome) + len(lost) < world and not errors:
            try:
                rank, status, value = results.get(timeout=_POLL_S)
            except queue.Empty:
                if announcer:
                    announcer.check(procs, outcome, errors)
                _check_alive(procs, outcome, errors, deadline, lost)
                continue
            reported.add(rank)
            (outcome if status == "ok" else errors)[rank] = value  # one failure is enough: peers would time out
    except Stopped as e:
        signum = e.signum
        raise
    finally:
        killed = _end(procs, signum, timeout_s if signum else _RANK_EXIT_S)
    if errors:
        died = {r: p.exitcode for r, p in enumerate(procs) if r not in reported | killed and p.exitcode}
        rank = min(errors)
        raise RankFailed(rank, *errors[rank], died=died)
    return [pickle.loads(outcome[r]) if r in outcome else None for r in range(world)]


class _LossAnnouncer:
    """spawn's side of regrouping: hosts the ranks' store and names the lost ranks in it."""

    def __init__(self, init_method, timeout_s, regroups):
        self.store, self.regroups = health.host_store(init_method, timeout_s), regroups
        self.lost, self.generation = {}, 0

    def check(self, procs, outcome, errors):
        """Announce the ranks that ended without a result while regroups are left, someone
        survives and every rank had joined (else _check_alive fails the run: the others would wait
        in the rendezvous, not in a collective)."""
        if (self.generation == self.regroups or not _newly_dead(procs, outcome, errors, self.lost)
                or not health.all_joined(self.store, len(procs))):
            return
        time.sleep(_POLL_S)  # ranks that die together are announced together
        dead = _newly_dead(procs, outcome, errors, self.lost)
        if len(self.lost) + len(dead) == len(procs):
            return
        self.generation += 1
        self.lost.update(dead)
        self.store.set(health.lost_key(self.generation), json.dumps(sorted(self.lost)))
        left = len(procs) - len(self.lost)
        print(f"galaxy: {_deaths(dead)}; regroup {self.generation} of {self.regroups}: {survivors_phrase(left)} "
              f"re-plan{'s' * (left == 1)} in place", file=sys.stderr, flush=True)


def survivors_phrase(count):
    """'the survivor' / 'the N survivors', for the lines that say who goes on."""
    return "the survivor" if count == 1 else f"the {count} survivors"


def _newly_dead(procs, outcome, errors, lost):
    return {r: p.exitcode for r, p in enumerate(procs)
            if r not in outcome and r not in errors and r not in lost and p.exitcode not in (None, 0)}


def _check_alive(procs, outcome, errors, deadline, lost):
    """A rank that died without reporting (killed, or failed before it could) fails the run now."""
    for rank, code in _newly_dead(procs, outcome, errors, lost).items():
        errors[rank] = (f"its process {_death(code)} before reporting a result (no traceback exists)", "")
    if not errors and deadline is not None and time.monotonic() > deadline:
        missing = [r for r in range(len(procs)) if r not in outcome and r not in lost]
        raise RuntimeError(f"ranks {missing} gave no result before the time limit")


def _end(procs, signum, wait_s):
    """SIGTERM the ranks still running if the launcher was signalled, wait up to wait_s for
    all of them, then kill what is left (at once on a second signal). Returns the ranks killed."""
    started = [p for p in procs if p.pid is not None]
    if signum:
        for p in started:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)  # not SIGINT: Python defers it while gloo blocks
    deadline = time.monotonic() + wait_s
    with contextlib.suppress(Stopped):
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
    killed = set()
    for rank, p in enumerate(procs):
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join()
            killed.add(rank)
    return killed


def run(main, world, rank, args=(), init_method=None, backend=None, timeout_s=300.0, threads=None, debug=False,
        survivors=None, restarts=0, in_place=False):
    """The entry scripts' launcher: main(rank, world, *args) runs with the process group joined,
    on this one rank, or on all ranks spawned here when no rank was given. A failing rank
    ends the launcher with one line naming the cause (the traceback too with debug).

    Elastic (a local spawn with `survivors`): when ranks die, up to `restarts` times the survivors
    start again with survivors(dead ranks, args) -> (world, args, what the restart does); or, with
    `in_place`, the survivors are told and go on in their own processes (spawn's regroups)."""
    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("galaxy: --backend nccl needs a CUDA GPU and torch sees none here; use --backend gloo")
    try:
        if rank is None and world > 1:
            print(local_spawn_line(world, cpu_cores(), threads or 1), file=sys.stderr, flush=True)
            with signals_raise_stopped():
                if in_place:
                    spawn(main, world, args, backend, timeout_s, init_method, threads=threads or 1, regroups=restarts)
                else:
                    _spawn_restarting(main, world, args, backend, timeout_s, init_method, threads or 1, survivors,
                                      restarts)
            return None
        if threads:
            torch.set_num_threads(threads)
        return _run_here(main, world, rank or 0, args, init_method, backend, timeout_s)
    except RankFailed as e:
        hint = " (--debug shows its traceback)" if e.details else ""  # a killed rank has none
        sys.exit(f"galaxy: {e if debug else e.line + hint}")
    except Stopped as e:
        print(f"galaxy: stopped by {e}; every rank started here has ended", file=sys.stderr)
        sys.exit(128 + e.signum)


def _spawn_restarting(main, world, args, backend, timeout_s, init_method, threads, survivors, restarts):
    """spawn, and after ranks die (up to `restarts` times, as `survivors` says) spawn the survivors."""
    for restart in range(1, restarts + 2):
        try:
            return spawn(main, world, args, backend, timeout_s, init_method, threads=threads)
        except RankFailed as e:
            if not (survivors and e.died) or restart > restarts:
                raise
            died = e.died
        world, args, what = survivors(sorted(died), args)
        print(f"galaxy: {_deaths(died)}; restart {restart} of {restarts}: {survivors_phrase(world)} "
              f"(renumbered in order) go on, {what}", file=sys.stderr, flush=True)


def _run_here(main, world, rank, args, init_method, backend, timeout_s):
    try:
        rendezvous = init_distributed(world, rank, init_method, backend, timeout_s)
        return call_reporting_peers(main, rank, world, args, rendezvous)
    except health.PeerError as e:
        sys.exit(f"galaxy: {e}")
    except Exception as e:
        raise RankFailed(rank, cause(e), traceback.format_exc()) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
