"""LLaMA's shape and rotary positions, from a Galaxy config or a Hugging Face config.json.

Hugging Face writes RoPE in two formats: before transformers 5 a top-level `rope_theta` and an
optional `rope_scaling` {"rope_type" (older: "type"), "factor", ...}; from transformers 5 one
`rope_parameters` {"rope_theta", "rope_type", ...} with no top-level rope_theta. Both become
`rope_theta` and `rope_scaling` here (None for plain RoPE). Only the fields below are read, so the
keys a checkpoint carries for transformers (dtype, architectures, transformers_version, ...) never
reach the engine's own.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path

from galaxy.plan import check_kv_heads
from galaxy.seeding import DEFAULT_SEED

# the keys each scaled RoPE type needs besides rope_type (galaxy/models/llama/rope.py uses them)
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None  # None: as many as query heads (no grouping)
    head_dim: int = None  # None: hidden_size / num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # None: plain RoPE; else {"rope_type": "linear" | "dynamic" | "llama3", ...}
    initializer_range: float = 0.02
    seed: int = DEFAULT_SEED  # the run seed: initial weights derive from it (galaxy.seeding)
    tie_word_embeddings: bool = False
    activation_checkpointing: bool = False
    overlap_tiles: int = 1  # > 1: Galaxy's tiled comm/compute overlap (galaxy.comm.overlap)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_kv_heads(self.num_attention_heads, self.num_key_value_heads)
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def position_limit(self):
        """The longest sequence it may run: dynamic RoPE rescales past max_position_embeddings by design."""
        dynamic = (self.rope_scaling or {}).get("rope_type") == "dynamic"
        return float("inf") if dynamic else self.max_position_embeddings

    @classmethod
    def from_dict(cls, d):
        """From a Hugging Face config.json (either RoPE format) or a Galaxy config; other keys are ignored."""
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"LLaMA config key '{key}' = {d[key]!r} is not supported")
        # transformers reads rope_scaling first when a config has both
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta")
        d = {**d, "rope_theta": theta, "rope_scaling": rope}
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    @classmethod
    def from_pretrained(cls, path):
        """From a Hugging Face directory's config.json."""
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def _check_rope_scaling(scaling, max_position_embeddings):
    """None for plain RoPE, else the scaling with its type under "rope_type"; other types are refused."""
    scaling = dict(scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_KEYS:
        raise ValueError(f"LLaMA rope_type '{kind}' is not supported (supported: default, {', '.join(ROPE_KEYS)})")
    if kind == "llama3":  # transformers' default when a checkpoint leaves it out
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in ROPE_KEYS[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"LLaMA rope_type '{kind}' needs {missing} in rope_scaling / rope_parameters")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"LLaMA partial_rotary_factor {scaling['partial_rotary_factor']} is not supported")
    return {"rope_type": kind, **scaling}
