"""Activations forward and gradients backward between neighbouring pipeline stages.

Receivers know every shape in advance ([micro_batch, seq, width] per stream, computed from
the micro-batch every stage holds, and a gradient has its activation's shape), so no
per-step metadata is exchanged. Sends are posted asynchronously and waited for only at
the end of the step: a stage never blocks on a send, so no ordering of the two neighbours'
actions can deadlock, and receives match sends in order (one FIFO per direction and pair).

Receives can be posted ahead (`post_recv_forward` / `post_recv_backward`), which the pipeline
step does one action early: gloo stalls a message that arrives before its receive is posted, and
under 1F1B activations and gradients cross one pair's socket in both directions at once
(docs/measurements.md).

With virtual stages (interleaved 1F1B) the ranks form a ring: the last rank's chunk c feeds the
first rank's chunk c + 1. At two ranks both directions then join the same pair of ranks, so each
direction has its own message tag (and its own FIFO).
"""
from collections import deque

import torch
import torch.distributed as dist

from galaxy.comm import stats
from galaxy.comm.collectives import RecordingGroup

TAGS = {stats.FWD: 1, stats.BWD: 2}


class StageLinks:
    """This rank's links to the same (data, tensor) coordinates on the previous/next stage.
    Each transfer is a list of tensors (the hidden states, plus e.g. a side network's state),
    posted as one batch; the receiver lists the same shapes in the same order."""

    def __init__(self, ctx):
        self.device = ctx.device
        ring, stages = ctx.plan.virtual_stages > 1, ctx.plan.pp_size
        self.prev = None if ctx.is_first_stage and not ring else ctx.pp_peer((ctx.pp_rank - 1) % stages)
        self.next = None if ctx.is_last_stage and not ring else ctx.pp_peer((ctx.pp_rank + 1) % stages)
        self.recording = isinstance(ctx.pp_group, RecordingGroup)  # sends only reported, receives left empty
        self.pending = []  # (tensors, works) of sends in flight; the tensors must outlive their send
        self.posted = {stats.FWD: deque(), stats.BWD: deque()}  # receives posted ahead, oldest first

    def send_forward(self, activations):
        self._send(activations, self.next, stats.FWD)

    def post_recv_forward(self, shapes, dtype):
        self.posted[stats.FWD].append(self._post_recv(shapes, dtype, self.prev, stats.FWD))

    def post_recv_backward(self, shapes, dtype):
        self.posted[stats.BWD].append(self._post_recv(shapes, dtype, self.next, stats.BWD))

    def recv_forward(self, shapes, dtype):
        return self._recv(shapes, dtype, self.prev, stats.FWD)

    def send_backward(self, grads):
        self._send(grads, self.prev, stats.BWD)

    def recv_backward(self, shapes, dtype):
        return self._recv(shapes, dtype, self.next, stats.BWD)

    def _send(self, tensors, peer, phase):
        tensors = [t.detach().contiguous() for t in tensors]
        for t in tensors:
            stats.record("send", t, phase)
        works = self._post(dist.isend, tensors, peer, phase)
        self.pending = [(t, w) for t, w in self.pending if not all(x.is_completed() for x in w)]
        self.pending.append((tensors, works))

    def _post_recv(self, shapes, dtype, peer, phase):
        bufs = [torch.empty(shape, dtype=dtype, device=self.device) for shape in shapes]
        return bufs, self._post(dist.irecv, bufs, peer, phase)

    def _post(self, op, tensors, peer, phase):
        if self.recording:
            return []
        return dist.batch_isend_irecv([dist.P2POp(op, t, peer, tag=TAGS[phase]) for t in tensors])

    def _recv(self, shapes, dtype, peer, direction):
        """The oldest receive posted ahead in this direction, else one posted now; waited for."""
        queue = self.posted[direction]
        bufs, works = queue.popleft() if queue else self._post_recv(shapes, dtype, peer, direction)
        if [tuple(b.shape) for b in bufs] != [tuple(s) for s in shapes] or bufs[0].dtype != dtype:
            raise RuntimeError(f"{direction} receive posted ahead for {[tuple(b.shape) for b in bufs]} "
                               f"{bufs[0].dtype}, consumed as {[tuple(s) for s in shapes]} {dtype}")
        for work in works:
            work.wait()
        return bufs

    def finish(self):
        """Wait for every send of this step (their receivers have them once this returns)."""
        for _, works in self.pending:
            for work in works:
                work.wait()
        self.pending = []
