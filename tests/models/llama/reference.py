"""An independent LLaMA written from the equations, for the tests: it reads a Hugging Face
directory (config.json + model.safetensors) and shares no code with galaxy.

RoPE is done with complex numbers: in the Hugging Face layout, features j and j + d/2 of a
head are the real and imaginary part of one complex number, multiplied by e^(i * pos * w_j)
with w_j = theta^(-2j/d). Grouped-query attention maps query head h to key/value head
h // (heads / kv_heads). The causal mask is explicit -inf above the diagonal.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _random_tensor(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * 0.1


def write_random_checkpoint(path, cfg):
    """Random weights in Hugging Face naming + config.json; norm scales random around 1."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    h, d = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (cfg["intermediate_size"], h),
                       p + "mlp.up_proj.weight": (cfg["intermediate_size"], h),
                       p + "mlp.down_proj.weight": (h, cfg["intermediate_size"]),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    tensors = {}
    for seed, (name, shape) in enumerate(sorted(shapes.items())):
        t = _random_tensor(shape, seed)
        tensors[name] = 1.0 + t if name.endswith("norm.weight") else t
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **cfg}))
    return path


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope(x, theta):
    """x [T, heads, d] -> rotated, position t = row index."""
    T, _, d = x.shape
    w = torch.tensor([theta ** (-2.0 * j / d) for j in range(d // 2)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * w[None, :]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def reference_logits(path, input_ids):
    """Logits [B, T, V] of one LLaMA forward pass, one sequence at a time."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    W = load_file(str(path / "model.safetensors"))
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv, d = cfg.get("num_key_value_heads") or nh, H // nh
    theta, eps = cfg.get("rope_theta", 10000.0), cfg["rms_norm_eps"]
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    out = []
    for ids in input_ids:
        T = len(ids)
        x = W["model.embed_tokens.weight"][ids]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = _rms(x, W[p + "input_layernorm.weight"], eps)
            q = _rope((h @ W[p + "self_attn.q_proj.weight"].T).view(T, nh, d), theta)
            k = _rope((h @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, d), theta)
            v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, d)
            heads = []
            for j in range(nh):
                g = j // (nh // nkv)
                scores = q[:, j] @ k[:, g].T / math.sqrt(d)
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
                heads.append(torch.softmax(scores, -1) @ v[:, g])
            x = x + torch.cat(heads, -1) @ W[p + "self_attn.o_proj.weight"].T
            h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ W[p + "mlp.gate_proj.weight"].T, h @ W[p + "mlp.up_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].T
        out.append(_rms(x, W["model.norm.weight"], eps) @ head.T)
    return torch.stack(out)
