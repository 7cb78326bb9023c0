"""Naming the rank that is gone.

A rank that is killed, crashes or never starts leaves its peers blocked: in the rendezvous,
or in a collective that gloo ends with a closed connection or after timeout_s. Gloo's message
names socket addresses, not ranks. So ranks meet in a TCPStore (hosted by rank 0) where each
leaves a "joined" key, and a daemon thread bumps each rank's heartbeat counter every second.
When the rendezvous times out, the missing "joined" keys name the ranks that never started;
when a collective fails, the counters that stopped moving name the ranks that died.

Regrouping (--elastic inference): the launcher that spawned the ranks hosts the store instead
of rank 0, so it outlives any rank. When a rank's process ends without a result, the launcher
writes the lost ranks under the next generation's key; a survivor whose collective failed
leaves the broken process group, reads that key and joins the survivors' new one
(`Rendezvous.regroup`). Ranks keep their order; a rank's number is its place among the living.
"""
import json
import socket
import sys
import threading
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed.rendezvous import _torchelastic_use_agent_store

BEAT_S = 1.0
PROGRESS_S = 10.0  # how often rank 0 says how many ranks have joined while it waits for the rest
_PROBE_TIMEOUT_S = 5.0
# substrings of the RuntimeErrors that gloo / NCCL / the store raise when a peer is gone
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "peer")


class PeerError(RuntimeError):
    """A peer rank never joined or stopped responding; the message names it."""


def _key(kind, rank):
    return f"galaxy/{kind}/{rank}"


def lost_key(generation):
    """Where the launcher names every rank lost up to `generation` (original numbers, a JSON list)."""
    return _key("lost", generation)


def all_joined(store, world):
    """Whether every rank of `world` has joined the rendezvous held in `store`."""
    return store.check([_key("joined", r) for r in range(world)])


_current = None  # this process's Rendezvous: the process group it made is process-wide state too


def current():
    """The Rendezvous this process joined through (None: one rank, or torch's own rendezvous)."""
    return _current


def host_store(init_method, timeout_s, world=None):
    """The store ranks join as clients at init_method's tcp:// address, hosted here (launcher or rank 0)."""
    url = urlparse(init_method)
    return dist.TCPStore(url.hostname, url.port, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def is_comm_error(error):
    """True for the errors a collective or the store raises when a peer is gone or too slow (a
    PeerError has already said which)."""
    if isinstance(error, PeerError):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _COMM_MARKERS)


def _client(host, port, timeout_s):
    """A client of the store at host:port, once host:port accepts connections. TCPStore's own connect
    retries overshoot its timeout severalfold, so a missing store host is detected here, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                break
        except OSError:
            if time.monotonic() >= deadline:
                raise dist.DistNetworkError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.2)
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _few(ranks, most=8):
    """'[1, 5]', or '52 ranks' for a long list."""
    return str(ranks) if len(ranks) <= most else f"{len(ranks)} ranks"


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


class Rendezvous:
    """The store all ranks joined through, and this rank's heartbeat."""

    def __init__(self, init_method, rank, world, timeout_s, launcher_hosts_store=False):
        global _current
        url = urlparse(init_method)
        self.host, self.port, self.rank, self.world = url.hostname, url.port, rank, world
        self.where = f"{self.host}:{self.port}"
        self.members, self.generation = list(range(world)), 0  # original ranks still in the group
        self.store = self._open(init_method, timeout_s, launcher_hosts_store)
        self._stop = threading.Event()
        self._beat_store = None
        _current = self

    def _open(self, init_method, timeout_s, launcher_hosts_store):
        # torchrun's agent hosts its own store, and so does an --elastic launcher
        host_here = self.rank == 0 and not (launcher_hosts_store or _torchelastic_use_agent_store())
        try:
            if host_here:
                return host_store(init_method, timeout_s, self.world)
            return _client(self.host, self.port, timeout_s)
        except RuntimeError as e:
            if "address already in use" in str(e).lower() or "EADDRINUSE" in str(e):
                raise PeerError(f"rank {self.rank}: rendezvous address {self.where} is already in use by another "
                                f"program; pick another --master_port") from None
            if host_here:
                raise
            raise PeerError(f"rank {self.rank}: could not reach rank 0's rendezvous store at {self.where} within "
                            f"{timeout_s:.0f}s: rank 0 never started, or it listens on another address/port "
                            f"({first_line(e)})") from None

    def join(self, timeout_s):
        """Wait until every rank has joined; name the ranks that did not. Rank 0 says every
        PROGRESS_S seconds how many have joined."""
        self.store.set(_key("joined", self.rank), "1")
        start = time.monotonic()
        while True:
            left = timeout_s - (time.monotonic() - start)
            try:
                self.store.wait([_key("joined", r) for r in range(self.world)],
                                timedelta(seconds=max(0.01, min(left, PROGRESS_S) if self.rank == 0 else left)))
                break
            except RuntimeError:
                missing = self._missing()
                if not missing:  # the last joined just after the wait gave up
                    continue
                if self.rank != 0 or time.monotonic() - start >= timeout_s:
                    raise PeerError(f"rank {self.rank}: rank(s) {missing} never joined the rendezvous at {self.where} "
                                    f"within {timeout_s:.0f}s (not started, crashed at start-up, or started with "
                                    f"another --world / --master_port)") from None
                print(f"galaxy: rank {self.rank}: waiting for ranks: {self.world - len(missing)}/{self.world} joined, "
                      f"{time.monotonic() - start:.0f} s (missing {_few(missing)}; gives up at timeout_s "
                      f"{timeout_s:.0f})", file=sys.stderr, flush=True)
        self._beat_store = _client(self.host, self.port, timeout_s)
        threading.Thread(target=self._beat, daemon=True, name="galaxy-heartbeat").start()

    def _missing(self):
        """The ranks that have not joined yet."""
        try:
            return [r for r in range(self.world) if not self.store.check([_key("joined", r)])]
        except RuntimeError:  # the store went away: rank 0 gave up (and reports the missing ranks)
            raise PeerError(f"rank {self.rank}: rank 0 closed the rendezvous at {self.where} before every "
                            f"rank joined") from None

    def _beat(self):
        while not self._stop.wait(BEAT_S):
            try:
                self._beat_store.add(_key("beat", self.rank), 1)
            except RuntimeError:  # the store's host has gone; the main thread reports it
                return

    def stop(self):
        self._stop.set()

    def silent_ranks(self):
        """Ranks whose heartbeat stood still for a few beats; None if the store itself is gone."""
        try:
            probe = _client(self.host, self.port, _PROBE_TIMEOUT_S)
            before = [probe.add(_key("beat", r), 0) for r in self.members]
            time.sleep(3 * BEAT_S)
            after = [probe.add(_key("beat", r), 0) for r in self.members]
        except RuntimeError:
            return None
        return [i for i, r in enumerate(self.members) if r != self.rank and after[i] == before[i]]

    def explain(self, error):
        """One line naming the lost rank(s) for a collective that failed with `error`."""
        silent = self.silent_ranks()
        if silent is None:
            who = f"rank 0 (host of the rendezvous store {self.where}) stopped responding / lost"
        elif silent:
            who = f"peer rank(s) {silent} stopped responding / lost"
        else:
            who = "every peer is still alive, but a collective failed or timed out (a peer is stuck or too slow)"
        return f"rank {self.rank}: {who}; collective error: {first_line(error)}"

    def regroup(self, error, backend, timeout_s):
        """After a collective failed with `error`: leave the broken process group, wait for the
        launcher to name the lost ranks, and join the survivors' new group. Returns every rank lost
        so far, in the original numbering. When the launcher names none within timeout_s, no rank
        died: the PeerError raised names the first rank's failure (the others' followed from its
        leaving). Collective over the survivors."""
        self.generation += 1
        first = _key("failed", self.generation)
        self.store.compare_set(first, "", f"rank {self.rank}: {first_line(error)}")  # set by the first rank here
        if dist.is_initialized():  # (not when joining the last group failed: a survivor was lost meanwhile)
            dist.destroy_process_group()  # closes this rank's connections: survivors blocked on it fail too
        try:
            self.store.wait([lost_key(self.generation)], timedelta(seconds=timeout_s))
        except RuntimeError:
            raise PeerError(f"rank {self.rank}: a collective failed but no rank was lost within {timeout_s:.0f}s; "
                            f"the first failure: {self.store.get(first).decode()}") from None
        lost = json.loads(self.store.get(lost_key(self.generation)))
        self.members = [r for r in self.members if r not in lost]
        dist.init_process_group(backend, store=dist.PrefixStore(f"galaxy/generation{self.generation}", self.store),
                                rank=self.members.index(self.rank), world_size=len(self.members),
                                timeout=timedelta(seconds=timeout_s))
        return lost
