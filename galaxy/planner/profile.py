"""What the planner measures on each rank: the time of the model's own blocks (attention,
MLP, connective of one layer and the embeddings, built serially at the given batch and sequence
length) and the link bandwidth between ranks; plus `slow_down`, which emulates a weaker device."""
import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from galaxy.comm import collectives as C
from galaxy.comm.context import ParallelContext
from galaxy.layers.placement import REPLICATE
from galaxy.models.bert.model import BertConfig, BertEmbeddings, bert_layer
from galaxy.models.llama.config import LlamaConfig
from galaxy.models.llama.model import causal_bias, llama_layer
from galaxy.models.llama.rope import Rotary
from galaxy.plan import Plan
from galaxy.planner.split import RankProfile
from galaxy.profiler.flops import FlopsProfiler


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


def _block_calls(cfg):
    """One serial layer of cfg's model (bert or llama, built at its batch and sequence) and a call per
    block: attention, MLP, connective (a pre-norm model's connective includes its norm), embeddings."""
    seq, heads, inter = cfg["seq_length"], cfg["num_attention_heads"], cfg["intermediate_size"]
    plan = Plan(heads=(heads,), kv_heads=(heads,), columns=(inter,), positions=(seq,), stage_layers=(1,))
    if cfg["model"] == "llama":
        lcfg = LlamaConfig.from_dict(cfg)
        layer = llama_layer(lcfg, ParallelContext(plan), Rotary(lcfg), REPLICATE)
        embeddings, bias = nn.Embedding(lcfg.vocab_size, lcfg.hidden_size), causal_bias(seq)
    else:
        bcfg = BertConfig.from_dict(cfg)
        layer, embeddings, bias = bert_layer(bcfg, ParallelContext(plan), 0, REPLICATE), BertEmbeddings(bcfg), None
    layer.eval()
    x = torch.randn(cfg["batch_size"], seq, cfg["hidden_size"])
    ids = torch.randint(cfg["vocab_size"], (cfg["batch_size"], seq))
    norm = layer.norm_mid or (lambda h: h)
    calls = {"attention": lambda: layer.attn(x, bias), "mlp": lambda: layer.mlp(x),
             "connective": lambda: layer.con1(norm(x), x), "embeddings": lambda: embeddings(ids)}
    return layer, calls


@torch.no_grad()
def measure_blocks(cfg, memory_bytes=float("inf"), repeats=5):
    """This rank's seconds per attention head, per MLP column, per position and for the
    embeddings (forward, at cfg's batch_size)."""
    _, calls = _block_calls(cfg)
    seconds = {name: _best_time(call, repeats) for name, call in calls.items()}
    return RankProfile(att_s_per_head=seconds["attention"] / cfg["num_attention_heads"],
                       mlp_s_per_column=seconds["mlp"] / cfg["intermediate_size"],
                       con_s_per_position=seconds["connective"] / cfg["seq_length"],
                       memory_bytes=memory_bytes, embed_s=seconds["embeddings"])


@torch.no_grad()
def block_flops(cfg):
    """FLOPs of the blocks measure_blocks times (galaxy.profiler.flops): {attention, mlp, connective}."""
    layer, calls = _block_calls(cfg)
    out = {}
    for name in ("attention", "mlp", "connective"):
        counter = FlopsProfiler(layer)
        counter.start()
        calls[name]()
        counter.stop()
        out[name] = counter.get_total_flops()
    return out


def profile_gflops(profile, flops, cfg):
    """GFLOP/s a rank's profile (RankProfile) shows per block, from its FLOPs (block_flops), and
    for the whole layer (attention, MLP, two connectives): how fast an emulated device ran."""
    seconds = {"attention": profile.att_s_per_head * cfg["num_attention_heads"],
               "mlp": profile.mlp_s_per_column * cfg["intermediate_size"],
               "connective": profile.con_s_per_position * cfg["seq_length"]}
    out = {name: flops[name] / seconds[name] / 1e9 for name in seconds}
    layer_s = seconds["attention"] + seconds["mlp"] + 2 * seconds["connective"]
    out["layer"] = (flops["attention"] + flops["mlp"] + 2 * flops["connective"]) / layer_s / 1e9
    return out


def measure_bandwidth(nbytes=8 << 20, repeats=3):
    """Bytes per second one rank sends in Galaxy's own all-gather of nbytes per rank (ring volume
    (p-1)*n); the slowest rank's figure, so every rank plans with the same number."""
    world = dist.get_world_size()
    x = torch.zeros(1, nbytes // 4)
    dist.barrier()
    seconds = torch.tensor(_best_time(lambda: C.start_all_gather(x, 0, [1] * world, dist.group.WORLD).wait(), repeats))
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return (world - 1) * nbytes / seconds.item()


class _SlowCompute(TorchFunctionMode):
    """Every torch call on this thread costs `factor` times its own CPU time: the extra is spent
    computing busily on this thread. CPU time, not wall time: a call that blocks (a DTensor op
    waiting for its peer's collective, which torch's own TP does inside e.g. `add`) burns no CPU,
    so waiting for the link or a peer is not multiplied, only compute is. Burning CPU rather than
    sleeping keeps the slowed rank as exposed to other processes' load as its peers, and no
    scheduler favours it as it would a sleeper (busy threads sharing a pinned core were diluted
    by that load: docs/measurements.md). Assumes torch computes on the calling thread
    (torch.set_num_threads(1), as the benchmarks run)."""

    def __init__(self, factor):
        super().__init__()
        self.extra = factor - 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        now = time.thread_time()
        until = now + self.extra * (now - start)
        while time.thread_time() < until:
            pass
        return out


def slow_down(rank, slowed, factor=2):
    """Emulate a weaker device: on `slowed` ranks every torch call (compute, not the waits for
    peers) takes `factor` times its CPU time, for the duration of the returned context. No rank is
    pinned to a core: pinned ranks meet whatever load their own core has, unlike each other."""
    return _SlowCompute(factor) if rank in slowed else contextlib.nullcontext()
