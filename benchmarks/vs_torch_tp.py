"""Our TP / Galaxy / SP vs torch's own tensor parallelism (DTensor: DeviceMesh + parallelize_module)
on the same BERT-base-shaped encoder, world 2 gloo, training steps interleaved side by side.

    python -m benchmarks.vs_torch_tp                  # 4 layers, seq 512, batch 4
    python -m benchmarks.vs_torch_tp --layers 2 --repeats 3

torch_tp     ColwiseParallel q,k,v,up + RowwiseParallel o,down (Megatron TP)  ~ our "tp"
torch_tp_sp  the same + SequenceParallel LayerNorms, sequence-sharded between blocks
             (Megatron sequence parallelism)                                  ~ our "galaxy"
Both models use our BertEmbeddings (replicated) and a plain torch BERT layer; the loss is the
same fixed linear function of the full output as in benchmarks.layouts. For LLaMA configs
(benchmarks.paper) the peer is a plain torch LLaMA decoder (nn.Embedding, pre-norm nn.RMSNorm
layers with rotary positions, causal attention and a SwiGLU MLP, final norm).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from benchmarks.common import Runner, bert_cfg, interleaved, median, parser, svg_bars, table, write_results
from galaxy.models.bert.model import BertConfig, BertEmbeddings
from galaxy.runtime.launch import spawn


class SelfAttention(nn.Module):
    """BERT's (bias, all positions) or, with `rotary` (cos, sin of every position), LLaMA's (no bias, causal)."""

    def __init__(self, hidden, heads, rotary=None):
        super().__init__()
        self.head_dim, self.rotary = hidden // heads, rotary
        self.query, self.key, self.value, self.out = (nn.Linear(hidden, hidden, bias=rotary is None) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.query, self.key, self.value))
        if self.rotary is not None:
            q, k = rotate(q, *self.rotary), rotate(k, *self.rotary)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.rotary is not None)
        return self.out(out.transpose(1, 2).reshape(B, T, -1))  # -1: local heads


def rotary_angles(seq, head_dim, theta=10000.0):
    """(cos, sin) [seq, head_dim / 2] of plain RoPE."""
    w = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq).float(), w)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class GatedFeedForward(nn.Module):
    """LLaMA's SwiGLU MLP."""

    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate, self.up = (nn.Linear(hidden, intermediate, bias=False) for _ in range(2))
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    """Post-norm BERT layer, plain torch."""

    def __init__(self, hidden, heads, intermediate):
        super().__init__()
        self.attention, self.norm1 = SelfAttention(hidden, heads), nn.LayerNorm(hidden, eps=1e-12)
        self.mlp, self.norm2 = FeedForward(hidden, intermediate), nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x):
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.mlp(x))


class LlamaLayer(nn.Module):
    """Pre-norm LLaMA decoder layer, plain torch."""

    def __init__(self, hidden, heads, intermediate, rotary, eps=1e-6):
        super().__init__()
        self.attention, self.norm1 = SelfAttention(hidden, heads, rotary), nn.RMSNorm(hidden, eps=eps)
        self.mlp, self.norm2 = GatedFeedForward(hidden, intermediate), nn.RMSNorm(hidden, eps=eps)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tp_plan(sequence_parallel, gated=False):
    """torch's parallel styles for one layer (`gated`: LLaMA's MLP); with sequence_parallel,
    activations between blocks stay sharded."""
    seq_out = dict(output_layouts=Shard(1)) if sequence_parallel else {}
    plan = {"attention.query": ColwiseParallel(), "attention.key": ColwiseParallel(),
            "attention.value": ColwiseParallel(), "attention.out": RowwiseParallel(**seq_out),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(**seq_out)}
    if gated:
        plan["mlp.gate"] = ColwiseParallel()
    if sequence_parallel:
        gather = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan.update({"attention": PrepareModuleInput(**gather), "mlp": PrepareModuleInput(**gather),
                     "norm1": SequenceParallel(use_local_output=True), "norm2": SequenceParallel(use_local_output=True)})
    return plan


def torch_backbone(cfg):
    """(embeddings, layers, final norm or None) of cfg's model family, plain torch."""
    sizes = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"])
    layers = range(cfg["num_hidden_layers"])
    if cfg["model"] == "llama":
        rotary = rotary_angles(cfg["seq_length"], cfg["hidden_size"] // cfg["num_attention_heads"])
        return (nn.Embedding(cfg["vocab_size"], cfg["hidden_size"]),
                nn.ModuleList(LlamaLayer(*sizes, rotary) for _ in layers), nn.RMSNorm(cfg["hidden_size"], eps=1e-6))
    return BertEmbeddings(BertConfig.from_dict(cfg)), nn.ModuleList(Layer(*sizes) for _ in layers), None


class TorchTP:
    """Runner-compatible (name, active, train_step, infer) torch-TP BERT encoder or LLaMA decoder on this rank."""

    def __init__(self, name, cfg, rank, mesh, sequence_parallel):
        self.name, self.active, self.mesh, self.sp = name, True, mesh, sequence_parallel
        torch.manual_seed(0)
        self.embeddings, self.layers, self.norm = torch_backbone(cfg)
        for layer in self.layers:
            parallelize_module(layer, mesh, tp_plan(sequence_parallel, gated=cfg["model"] == "llama"))
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, cfg["vocab_size"], (cfg["batch_size"], cfg["seq_length"]), generator=g)
        self.weight = torch.randn(cfg["batch_size"], cfg["seq_length"], cfg["hidden_size"], generator=g)
        self.rank = rank

    def forward(self):
        x = self.embeddings(self.ids)
        if self.sp:
            x = x.chunk(self.mesh.size(), dim=1)[self.rank]
        for layer in self.layers:
            x = layer(x)
        if self.norm is not None:  # each rank normalises its own positions, as ours do
            x = self.norm(x)
        if self.sp:  # back to the full sequence on every rank, as our layouts return it
            x = DTensor.from_local(x, self.mesh, [Shard(1)]).full_tensor()
        return x

    @torch.no_grad()
    def infer(self):
        return self.forward()

    def train_step(self):
        (self.forward() * self.weight).sum().backward()
        for module in (self.embeddings, self.layers, self.norm):
            if module is not None:
                module.zero_grad(set_to_none=True)


def bench(rank, world, args):
    mesh = init_device_mesh("cpu", (world,))
    size = dict(layers=args.layers, seq=args.seq, batch=args.batch)
    runners = [Runner(name, bert_cfg(name, **size), rank, world) for name in ("tp", "galaxy", "sp")]
    cfg = bert_cfg("serial", **size)
    runners += [TorchTP("torch_tp", cfg, rank, mesh, False), TorchTP("torch_tp_sp", cfg, rank, mesh, True)]
    return interleaved(runners, lambda r: r.train_step(), args.repeats)


def main():
    p = parser(__doc__)
    args = p.parse_args()
    times = spawn(bench, 2, (args,), timeout_s=args.timeout_s)[0]
    med = {k: median(v) for k, v in times.items()}
    rows = [[name, f"{med[name] * 1e3:.0f}", f"{min(times[name]) * 1e3:.0f}", f"{max(times[name]) * 1e3:.0f}",
             f"{med['torch_tp'] / med[name]:.2f}x", f"{med['torch_tp_sp'] / med[name]:.2f}x"] for name in med]
    print(f"BERT-base-shaped encoder ({args.layers} layers), seq {args.seq}, batch {args.batch}, world 2 gloo, "
          f"{args.repeats} interleaved rounds (speed-up > 1 = faster than torch)")
    headers = ["impl", "median ms", "min ms", "max ms", "vs torch_tp", "vs torch_tp_sp"]
    print(table(rows, headers))
    group = f"{args.layers} layers seq {args.seq} batch {args.batch}"
    chart = svg_bars([group], list(med), {(group, k): m * 1e3 for k, m in med.items()},
                     "training step, BERT-base-shaped encoder, world 2 gloo (median ms)")
    write_results(args.out_dir, "vs_torch_tp", [dict(zip(headers, row, strict=True)) for row in rows], chart)


if __name__ == "__main__":
    main()
