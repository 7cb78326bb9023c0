"""An emulated edge network on this machine: every rank in its own Linux network namespace, each
joined to a switch (a bridge in a namespace of its own) by its own veth link, shaped with tc (rate,
delay) in both directions: every device has one link of that rate, as on an Ethernet switch.

Shaping uses the netem qdisc (rate + one-way delay) when the kernel has it; otherwise the tbf
qdisc (token bucket: rate only) and the delay is NOT applied -- `EdgeNet.shaping` says which
was used, and the scripts print it. (This machine's kernel has tbf/htb but no sch_netem.)

    sudo python -m benchmarks.netem --rate 100mbit --delay 1ms   # set up, measure throughput, tear down

Needs root and iproute2 (`ip`, `tc`; on Debian/Ubuntu: apt-get install iproute2). It only
creates and uses its own namespaces (gxnet0, gxnet1, ... and gxnethub), its own veth pairs and the
addresses 10.77.0.1, 10.77.0.2, ... inside those namespaces, and removes them on exit.
"""
import argparse
import os
import shutil
import subprocess
import sys

SUBNET = "10.77.0"
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
            _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for ns, dev, port, addr in zip(self.ns, self.dev, self.port, self.addr):
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

    def run_ranks(self, argv, timeout_s):
        """Run `argv --rank r` in each rank's namespace and wait; raise naming the exit codes if any
        rank fails (a rank still running at the timeout is killed)."""
        procs = [self.popen(r, [*argv, "--rank", str(r)]) for r in range(len(self.ns))]
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise SystemExit(f"{' '.join(argv[1:3])}: ranks exited with {codes} ({self.shaping})")


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
    args = p.parse_args()
    with EdgeNet(args.rate, args.delay) as net:
        print(net.shaping)
        print(f"measured {probe(net) / 1e6:.1f} Mbit/s rank 0 -> rank 1 (one TCP stream, 8 MB)")


if __name__ == "__main__":
    main()
