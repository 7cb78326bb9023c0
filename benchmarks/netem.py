"""An emulated edge network on this machine: every rank in its own Linux network namespace, each
joined to a switch (a bridge in a namespace of its own) by its own veth link, shaped with tc (rate,
delay) in both directions: every device has one link of that rate, as on an Ethernet switch.

Shaping uses the netem qdisc (rate + one-way delay) when the kernel has it; otherwise the tbf
qdisc (token bucket: rate only) and the delay is NOT applied -- `EdgeNet.shaping` says which
was used, and the scripts print it. (This machine's kernel has tbf/htb but no sch_netem.)

    sudo python -m benchmarks.netem --rate 100mbit --delay 1ms   # set up, measure throughput, tear down
    sudo python -m benchmarks.netem --rate 1gbit --run "python pretrain_galaxy.py --config_file ... --world 2"

Needs root and iproute2 (`ip`, `tc`; on Debian/Ubuntu: apt-get install iproute2). It only
creates and uses its own namespaces (gxnet0, gxnet1, ... and gxnethub), its own veth pairs and the
addresses 10.77.0.1, 10.77.0.2, ... (and 10.77.0.254, the switch's) inside those namespaces, and
removes them on exit. call_ranks / ranks_over run a function of a benchmark on ranks in them.
"""
import argparse
import ctypes
import importlib
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SUBNET = "10.77.0"
HUB = f"{SUBNET}.254"  # the switch's own address (the launcher's store, for ranks that regroup)
CALL_PORT = 29563
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bits(rate):
    """'100mbit' -> 1e8 bits/s (tc's unit names)."""
    for unit, scale in UNITS.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: expected a number followed by one of {list(UNITS)}")


def _sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def add_worker_args(p):
    """The hidden arguments with which a benchmark script re-runs itself as one rank in a namespace."""
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--master_addr", help=argparse.SUPPRESS)


def check_tools():
    """Raise with what to install/do when the emulator cannot run here."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"netem: {missing} not found; install iproute2 (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise SystemExit("netem: network namespaces and tc need root")


class EdgeNet:
    """Context manager: `world` namespaces {prefix}0, {prefix}1, ... with addresses 10.77.0.1, .2, ...,
    each linked to a bridge in namespace {prefix}hub by a veth pair whose both directions are shaped
    to `rate` with one-way `delay` (netem): a rank sends and receives at `rate` at most."""

    def __init__(self, rate="100mbit", delay="1ms", prefix="gxnet", world=2):
        self.rate, self.delay = rate, delay
        self.ns = [f"{prefix}{r}" for r in range(world)]
        self.hub = f"{prefix}hub"
        self.dev = [f"{prefix}v{r}" for r in range(world)]  # the rank's end of its link
        self.port = [f"{prefix}p{r}" for r in range(world)]  # the switch's end
        self.addr = [f"{SUBNET}.{r + 1}" for r in range(world)]
        self.shaping = None

    def __enter__(self):
        check_tools()
        self.teardown()  # leftovers of an interrupted run
        try:
            for ns in (self.hub, *self.ns):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.hub, "addr", "add", f"{HUB}/24", "dev", "br0")
            _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for ns, dev, port, addr in zip(self.ns, self.dev, self.port, self.addr, strict=True):
                _sh("ip", "link", "add", dev, "type", "veth", "peer", "name", port)
                _sh("ip", "link", "set", dev, "netns", ns)
                _sh("ip", "link", "set", port, "netns", self.hub)
                _sh("ip", "-n", self.hub, "link", "set", port, "master", "br0")
                _sh("ip", "-n", self.hub, "link", "set", port, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                self._shape(ns, dev)  # what the rank sends
                self._shape(self.hub, port)  # what it receives
        except subprocess.CalledProcessError as e:
            self.teardown()
            raise SystemExit(f"netem: `{' '.join(e.cmd)}` failed: {e.stderr.strip()}") from None
        return self

    def _shape(self, ns, dev):
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
        # deep queues: dropping bursts at low rates would add TCP retransmissions to the timings
        netem = subprocess.run(tc + ["netem", "delay", self.delay, "rate", self.rate, "limit", "100000"],
                               capture_output=True, text=True)
        if netem.returncode == 0:
            self.shaping = f"netem rate {self.rate} delay {self.delay}"
            return
        burst = max(16_000, int(rate_bits(self.rate) / 8 / 1000))  # >= 1 ms of data per token refill
        _sh(*tc, "tbf", "rate", self.rate, "burst", str(burst), "latency", "2s")
        self.shaping = f"tbf rate {self.rate} (no netem in this kernel: delay {self.delay} not applied)"

    def __exit__(self, *exc):
        self.teardown()

    def teardown(self):
        for ns in (*self.ns, self.hub):  # deleting a namespace deletes the veth ends inside it, and so the pairs
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def env(self, rank):
        """Environment for a rank: gloo must use this rank's veth, not guess from the hostname."""
        return dict(os.environ, GLOO_SOCKET_IFNAME=self.dev[rank])

    def popen(self, rank, argv, **kw):
        """Start argv inside rank's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns[rank], *argv], env=self.env(rank), **kw)

    def start_ranks(self, argv, world=None):
        """Start `argv --rank r` in the first `world` ranks' namespaces (all by default)."""
        return [self.popen(r, [*argv, "--rank", str(r)]) for r in range(world or len(self.ns))]

    @contextmanager
    def in_hub(self):
        """This thread in the switch's namespace (sockets it opens, threads and processes it starts
        are there): what it serves is reached at HUB from every rank's namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{self.hub}") as hub:
            _setns(libc, hub)
            try:
                yield
            finally:
                _setns(libc, home)

    def run_ranks(self, argv, timeout_s, world=None):
        """Run `argv --rank r` in each rank's namespace and wait; raise naming the exit codes if any
        rank fails (a rank still running at the timeout is killed)."""
        procs = self.start_ranks(argv, world)
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise SystemExit(f"{' '.join(argv[1:3])}: ranks exited with {codes} ({self.shaping})")


def _setns(libc, ns_file):
    if libc.setns(ns_file.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), f"setns {ns_file.name}")


class _Exited:
    """A rank's process as galaxy.runtime.launch's loss announcer reads one (exitcode)."""

    def __init__(self, popen):
        self.popen = popen

    @property
    def exitcode(self):
        return self.popen.poll()


def call_ranks(net, target, args, timeout_s, regroups=0, world=None):
    """target(rank, world, *args) on the first `world` ranks of `net` (all by default), each in its
    namespace, joined in a gloo group; target is "module:function", args picklable. Returns each
    rank's return value (None for a rank lost without one). With regroups > 0 the ranks' store is the
    launcher's, in the switch's namespace, and up to `regroups` times a rank that dies is announced to the others
    (galaxy.runtime.launch.spawn's regroups, over the shaped links)."""
    world = world or len(net.ns)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "call.pkl").write_bytes(pickle.dumps((target, args, world, timeout_s, bool(regroups))))
        addr = HUB if regroups else net.addr[0]
        argv = [sys.executable, "-m", "benchmarks.netem", "--call", tmp, "--master_addr", addr]
        if regroups:
            _run_regrouping(net, argv, f"tcp://{addr}:{CALL_PORT}", timeout_s, regroups, world)
        else:
            net.run_ranks(argv, timeout_s, world)
        out = [Path(tmp, f"rank{r}.pkl") for r in range(world)]
        return [pickle.loads(f.read_bytes()) if f.exists() else None for f in out]


@contextmanager
def ranks_over(link, world, prefix="gxcall"):
    """Yields (call, shaping): call(target, world, args, timeout_s, regroups=0) runs
    target(rank, world, *args) ("module:function") on `world` ranks (at most the `world` given here)
    and returns each rank's return value: local processes on loopback when `link` is None
    (galaxy.runtime.launch.spawn; shaping "loopback"), else each in its namespace behind a link of
    that rate (call_ranks; EdgeNet's shaping)."""
    if link is None:
        yield _spawned, "loopback"
        return
    with EdgeNet(link, prefix=prefix, world=world) as net:
        yield (lambda target, ranks, args, timeout_s, regroups=0:
               call_ranks(net, target, args, timeout_s, regroups, ranks)), net.shaping


def _spawned(target, world, args, timeout_s, regroups=0):
    from galaxy.runtime.launch import spawn
    module, name = target.split(":")
    return spawn(getattr(importlib.import_module(module), name), world, args, timeout_s=timeout_s, regroups=regroups)


def _run_regrouping(net, argv, init_method, timeout_s, regroups, world):
    """Start the ranks with the store hosted here, announce the ones that die, wait for the rest."""
    from galaxy.runtime.launch import _LossAnnouncer  # spawn's own announcer, on processes of ours
    with net.in_hub():
        announcer = _LossAnnouncer(init_method, timeout_s, regroups)
        procs = net.start_ranks(argv, world)
    watched, deadline = [_Exited(p) for p in procs], time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            announcer.check(watched, {}, {})
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.wait() for p in procs]
    if any(code and r not in announcer.lost for r, code in enumerate(codes)):
        raise SystemExit(f"{argv[2]}: ranks exited with {codes} (lost and announced: {sorted(announcer.lost)}; "
                         f"{net.shaping})")


def _called_rank(call_dir, rank, master_addr):
    """One rank of call_ranks, inside its namespace: join, call, leave its return value in call_dir."""
    import torch
    import torch.distributed as dist

    from galaxy.runtime.launch import call_reporting_peers, init_distributed
    target, args, world, timeout_s, hosted = pickle.loads(Path(call_dir, "call.pkl").read_bytes())
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    torch.set_num_threads(1)  # the ranks share this machine's cores (the library never sets it)
    rendezvous = init_distributed(world, rank, f"tcp://{master_addr}:{CALL_PORT}", "gloo", timeout_s,
                                  launcher_hosts_store=hosted)
    result = call_reporting_peers(fn, rank, world, args, rendezvous)
    Path(call_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 29411)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; start = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    start = start or time.perf_counter(); n += len(b)
print(n, time.perf_counter() - start, flush=True)
"""
_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 29411)); c.sendall(bytes(int(sys.argv[2]))); c.close()
"""


def probe(net, nbytes=8_000_000):
    """Measured throughput rank 0 -> rank 1 over the shaped link, bits/s (one TCP stream)."""
    sink = net.popen(1, [sys.executable, "-c", _SINK, net.addr[1]], stdout=subprocess.PIPE, text=True)
    sink.stdout.readline()  # listening
    subprocess.run(["ip", "netns", "exec", net.ns[0], sys.executable, "-c", _SOURCE, net.addr[1], str(nbytes)],
                   check=True, timeout=120)
    n, seconds = sink.communicate(timeout=120)[0].split()
    return int(n) * 8 / float(seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--delay", default="1ms")
    p.add_argument("--world", type=int, default=2, help="ranks (namespaces)")
    p.add_argument("--run", help="a command to run in every rank's namespace instead of the probe, with --rank R "
                                 "--master_addr (rank 0's address) added, e.g. \"python pretrain_galaxy.py "
                                 "--config_file ... --world 2 --trace_dir traces\"")
    p.add_argument("--timeout_s", type=float, default=600, help="--run: kill the ranks after this long")
    p.add_argument("--call", help=argparse.SUPPRESS)  # one rank of call_ranks
    add_worker_args(p)
    args = p.parse_args()
    if args.call:
        return _called_rank(args.call, args.rank, args.master_addr)
    with EdgeNet(args.rate, args.delay, world=args.world) as net:
        print(net.shaping)
        if args.run:
            return net.run_ranks([*shlex.split(args.run), "--master_addr", net.addr[0]], args.timeout_s)
        print(f"measured {probe(net) / 1e6:.1f} Mbit/s rank 0 -> rank 1 (one TCP stream, 8 MB)")


if __name__ == "__main__":
    main()
