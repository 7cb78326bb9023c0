"""LLaMA's shape and rotary positions, from a Galaxy config or a Hugging Face config.json.

Hugging Face writes RoPE in two formats: before transformers 5 a top-level `rope_theta` and an
optional `rope_scaling` {"rope_type" (older: "type"), "factor", ...}; from transformers 5 one
`rope_parameters` {"rope_theta", "rope_type", ...} with no top-level rope_theta. Both become
`rope_theta` and `rope_scaling` here (None for plain RoPE). Only the fields below are read, so the
keys a checkpoint carries for transformers (dtype, architectures, transformers_version, ...) never
reach the engine's own.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from galaxy.keys import check_transformer, from_keys, key, settle
from galaxy.plan import check_kv_heads
from galaxy.seeding import DEFAULT_SEED

# the keys each scaled RoPE type needs besides rope_type (galaxy/models/llama/rope.py uses them)
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = key(32000, "token embeddings (a tokenizer may not hold more pieces)")
    hidden_size: int = key(4096, "width of every layer's input and output")
    intermediate_size: int = key(11008, "SwiGLU MLP columns per layer")
    num_hidden_layers: int = key(32, "decoder layers")
    num_attention_heads: int = key(32, "query heads per layer")
    num_key_value_heads: int = key(None, "GQA key/value heads (divides num_attention_heads; default: as many "
                                         "as query heads, no grouping)")
    head_dim: int = key(None, "width of one attention head (default: hidden_size / num_attention_heads)")
    hidden_act: str = key("silu", "MLP activation, as Hugging Face names it")
    max_position_embeddings: int = key(4096, "positions the model was trained on (rotary: no table)")
    rms_norm_eps: float = key(1e-6, "RMSNorm epsilon")
    rope_theta: float = key(10000.0, "RoPE base")
    rope_scaling: dict = key(None, "RoPE scaling as Hugging Face writes it, e.g. {\"rope_type\": \"linear\", "
                                   "\"factor\": 4.0}; rope_type linear | dynamic | llama3 (default: plain RoPE)")
    initializer_range: float = key(0.02, "standard deviation of the initial weights")
    seed: int = key(DEFAULT_SEED, "the run seed: initial weights derive from it (galaxy.seeding)")
    tie_word_embeddings: bool = key(False, "share input embeddings with the output head")
    activation_checkpointing: bool = key(False, "recompute each layer in backward instead of keeping it")
    overlap_tiles: int | list[int] = key(1, "> 1 or tile sizes: Galaxy's tiled overlap (galaxy.comm.overlap)")

    def __post_init__(self):
        check_transformer(self, eps="rms_norm_eps")
        kv = self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads
        check_kv_heads(self.num_attention_heads, kv)
        settle(self, num_key_value_heads=kv, head_dim=self.head_dim or self.hidden_size // self.num_attention_heads,
               rope_scaling=_check_rope_scaling(self.rope_scaling, self.max_position_embeddings))

    @property
    def position_limit(self):
        """The longest sequence it may run: dynamic RoPE rescales past max_position_embeddings by design."""
        dynamic = (self.rope_scaling or {}).get("rope_type") == "dynamic"
        return float("inf") if dynamic else self.max_position_embeddings

    @classmethod
    def from_dict(cls, d):
        """From a Hugging Face config.json (either RoPE format) or a Galaxy config; other keys are ignored."""
        for name in ("attention_bias", "mlp_bias"):
            if d.get(name):
                raise ValueError(f"LLaMA config key '{name}' = {d[name]!r} is not supported")
        # transformers reads rope_scaling first when a config has both
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta")
        return from_keys(cls, {**d, "rope_theta": theta, "rope_scaling": rope})

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
