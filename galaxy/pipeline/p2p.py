"""Activations forward and gradients backward between neighbouring pipeline stages.

Receivers know every shape in advance ([micro_batch, seq, hidden], computed from the
micro-batch every stage holds, and a gradient has its activation's shape), so no
per-step metadata is exchanged. Sends are posted asynchronously and waited for only at
the end of the step: a stage never blocks on a send, so no ordering of the two neighbours'
actions can deadlock, and receives match sends in order (one FIFO per direction and pair).
"""
import torch
import torch.distributed as dist

from galaxy.comm import stats


class StageLinks:
    """This rank's links to the same (data, tensor) coordinates on the previous/next stage."""

    def __init__(self, ctx):
        self.prev = None if ctx.is_first_stage else ctx.pp_peer(ctx.pp_rank - 1)
        self.next = None if ctx.is_last_stage else ctx.pp_peer(ctx.pp_rank + 1)
        self.pending = []  # (tensor, works) of sends in flight; the tensor must outlive its send

    def send_forward(self, activation):
        self._send(activation, self.next, stats.FWD)

    def recv_forward(self, shape, dtype):
        return self._recv(shape, dtype, self.prev)

    def send_backward(self, grad):
        self._send(grad, self.prev, stats.BWD)

    def recv_backward(self, shape, dtype):
        return self._recv(shape, dtype, self.next)

    def _send(self, tensor, peer, phase):
        tensor = tensor.detach().contiguous()
        stats.record("send", tensor, phase)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, peer)])
        self.pending = [(t, w) for t, w in self.pending if not all(x.is_completed() for x in w)]
        self.pending.append((tensor, works))

    def _recv(self, shape, dtype, peer):
        buf = torch.empty(shape, dtype=dtype)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, peer)]):
            work.wait()
        return buf

    def finish(self):
        """Wait for every send of this step (their receivers have them once this returns)."""
        for _, works in self.pending:
            for work in works:
                work.wait()
        self.pending = []
