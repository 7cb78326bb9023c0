"""What the planner measures on each rank: the time of the model's own blocks (attention,
MLP, connective of one layer and the embeddings, built serially at the given batch and sequence
length) and the link bandwidth between ranks; plus `slow_down`, which emulates a weaker device."""
import contextlib
import time

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from galaxy.comm import collectives as C
from galaxy.comm.context import ParallelContext
from galaxy.layers.placement import REPLICATE
from galaxy.models.bert.model import BertConfig, BertEmbeddings, bert_layer
from galaxy.plan import Plan
from galaxy.planner.split import RankProfile


def _best_time(fn, repeats):
    """Fastest of `repeats` runs after a warm-up: other processes only ever add time, so the
    minimum is the steadiest estimate of this rank's own speed (a slowed rank stays slow)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure_blocks(cfg, memory_bytes=float("inf"), repeats=5):
    """This rank's seconds per attention head, per MLP column, per position and for the
    embeddings (forward, at cfg's batch_size)."""
    bcfg = BertConfig.from_dict(cfg)
    seq, heads, inter = cfg["seq_length"], cfg["num_attention_heads"], cfg["intermediate_size"]
    plan = Plan(heads=(heads,), kv_heads=(heads,), columns=(inter,), positions=(seq,), stage_layers=(1,))
    layer = bert_layer(bcfg, ParallelContext(plan), 0, REPLICATE).eval()
    x = torch.randn(cfg["batch_size"], seq, cfg["hidden_size"])
    embeddings = BertEmbeddings(bcfg).eval()
    ids = torch.randint(cfg["vocab_size"], (cfg["batch_size"], seq))
    return RankProfile(att_s_per_head=_best_time(lambda: layer.attn(x), repeats) / heads,
                       mlp_s_per_column=_best_time(lambda: layer.mlp(x), repeats) / inter,
                       con_s_per_position=_best_time(lambda: layer.con1(x, x), repeats) / seq,
                       memory_bytes=memory_bytes, embed_s=_best_time(lambda: embeddings(ids), repeats))


def measure_bandwidth(nbytes=8 << 20, repeats=3, group=None):
    """Bytes per second one rank sends in Galaxy's own all-gather of nbytes per rank (ring volume
    (p-1)*n); the slowest rank's figure, so every rank plans with the same number."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    x = torch.zeros(1, nbytes // 4)
    dist.barrier(group=group)
    seconds = torch.tensor(_best_time(lambda: C.start_all_gather(x, 0, [1] * world, group).wait(), repeats))
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    return (world - 1) * nbytes / seconds.item()


class _SlowCompute(TorchFunctionMode):
    """Every torch call on this thread takes `factor` times its own time: the extra is spent
    waiting busily, on the wall clock. The slowed rank is then as exposed to other processes'
    load as its peers, and no scheduler favours it as it would a sleeper (busy threads sharing a
    pinned core were diluted by that load: docs/measurements.md)."""

    def __init__(self, factor):
        super().__init__()
        self.extra = factor - 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        now = time.perf_counter()
        until = now + self.extra * (now - start)
        while time.perf_counter() < until:
            pass
        return out


def slow_down(rank, slowed, factor=2):
    """Emulate a weaker device: on `slowed` ranks every torch call (compute, not the waits for
    peers) takes `factor` times its time, for the duration of the returned context. No rank is
    pinned to a core: pinned ranks meet whatever load their own core has, unlike each other."""
    return _SlowCompute(factor) if rank in slowed else contextlib.nullcontext()
