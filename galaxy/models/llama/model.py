"""LLaMA decoder and causal-LM head, written once for every layout.

Read it as a plain LLaMA: token embeddings -> N x pre-norm layers (RMSNorm -> ATT with
rotary positions and grouped-query heads -> residual, RMSNorm -> SwiGLU MLP -> residual)
-> RMSNorm -> lm_head. The ParallelContext's plan decides, per block, which heads /
columns / positions this rank builds and computes (galaxy.layers); with the default
context it is the serial model. Under pipeline parallelism a rank builds only its stage:
embeddings on the first, its own layers, the final norm and lm_head on the last.

Parameter names are ours; HF_NAMES maps them to Hugging Face's for checkpoints.
"""
import json
from functools import partial

import torch
from torch import nn

from galaxy.layers.attention import Attention
from galaxy.layers.mlp import MLP
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.placement import SEQ, consumes, redistribute
from galaxy.layers.transformer import Connective, TransformerLayer, build_chunks, run_layers
from galaxy.models import checkpoint
from galaxy.models.common import causal_bias, init_weights, lm_loss, on_context_device
from galaxy.models.llama.config import LlamaConfig
from galaxy.models.llama.rope import Rotary
from galaxy.plan import Method

IGNORE_INDEX = -100

HF_NAMES = [
    (r"\.attn\.([qkvo])\.", r".self_attn.\1_proj."),
    (r"\.mlp\.(gate|up|down)\.", r".mlp.\1_proj."),
    (r"\.norm_in\.", ".input_layernorm."),
    (r"\.norm_mid\.", ".post_attention_layernorm."),
]
TIED_HEAD = [(r"^lm_head\.weight$", "model.embed_tokens.weight")]
UNSEEN_IN_SHAPES = ("rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act")  # checked against config.json
HF_EXTRAS = (r"rotary_emb\.inv_freq$",)  # a buffer older transformers saved; computed from rope_theta here


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as LLaMA does under bf16)."""

    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def llama_layer(cfg, ctx, rotary, input_placement):
    """One decoder layer: pre-norms in the layer, connective blocks are only the residual adds."""
    plan, h = ctx.plan, cfg.hidden_size
    attn = Attention(h, cfg.num_attention_heads, plan.att, ctx, num_kv_heads=cfg.num_key_value_heads,
                     head_dim=cfg.head_dim, bias=False, rotary=rotary)
    mlp = MLP(h, cfg.intermediate_size, plan.mlp, ctx, act=cfg.hidden_act, gated=True, bias=False)
    con1, con2 = (Connective(None, 0.0, 0, plan.con, ctx) for _ in range(2))
    return TransformerLayer(attn, mlp, con1, con2, plan, input_placement, norm_in=RMSNorm(h, cfg.rms_norm_eps),
                            norm_mid=RMSNorm(h, cfg.rms_norm_eps), overlap_tiles=cfg.overlap_tiles)


class LlamaModel(nn.Module):
    """Embeddings + decoder layers (+ final norm on the last stage); returns hidden states
    [B, T, H], replicated on every tensor rank."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config, self.ctx = cfg, ctx
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.ctx.is_first_stage else None
        self.rotary = Rotary(cfg)
        self.layers, self.chunks = build_chunks(ctx, lambda i, placement: llama_layer(cfg, ctx, self.rotary, placement))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.ctx.is_last_stage else None
        if self.norm is not None and consumes(self.ctx.plan.con) == SEQ:
            set_spec(*self.norm.parameters(), grad_sum=GradSum.STAGE)  # it runs on this rank's positions only

    def forward(self, input_ids=None, attention_mask=None, hidden_states=None, past_length=0, chunk=0):
        """past_length: tokens already in the layers' KV caches (generation); attention_mask,
        if given, covers those too. chunk: run only this rank's chunk c (interleaved 1F1B): it
        embeds at chunk 0 of the first stage and normalises at the last chunk of the last."""
        x = self.embed_tokens(input_ids) if self.embed_tokens is not None and chunk == 0 else hidden_states
        bias = None  # a single new token sees every earlier one: no [L, L] bias each decode step
        if x.shape[1] > 1 or attention_mask is not None:
            bias = causal_bias(past_length + x.shape[1], attention_mask, x.dtype, x.device)
        x, placement = run_layers([self.layers[i] for i in self.chunks[chunk]], x, bias,
                                  self.config.activation_checkpointing)
        if self.norm is not None and chunk == len(self.chunks) - 1:  # before the gather: own positions only
            x = self.norm(x)
        return redistribute(x, placement, Method.NONE, self.ctx)


class LlamaForCausalLM(nn.Module):
    """LLaMA with the LM head. forward returns logits [B, T, V], or with labels (aligned with
    input_ids; the shift by one happens here) (sum of token losses, number of label tokens)."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config = cfg
        self.to_hf = partial(checkpoint.rename, rules=TIED_HEAD + HF_NAMES if cfg.tie_word_embeddings else HF_NAMES)
        self.model = LlamaModel(cfg, ctx)
        self.ctx = self.model.ctx
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.ctx.is_last_stage else None
        if self.lm_head is not None and cfg.tie_word_embeddings:
            if self.model.embed_tokens is not None:
                self.lm_head.weight = self.model.embed_tokens.weight
            else:  # a pipeline's last stage holds its own copy; it starts equal to the embeddings
                set_spec(self.lm_head.weight, grad_sum=GradSum.TIED, init_name="model.embed_tokens.weight")
        elif self.model.embed_tokens is not None and cfg.tie_word_embeddings:  # first stage: the last holds a copy
            set_spec(self.model.embed_tokens.weight, has_tied_copy=True)
        init_weights(self, cfg.initializer_range, cfg.seed)

    @property
    def side_backbone(self):
        """The module whose output a side network (side-tuning) replaces or adds to: the decoder
        stack with its final norm. The side blocks are token-wise, so generation needs no side cache."""
        return self.model

    def forward(self, input_ids=None, attention_mask=None, labels=None, hidden_states=None, past_length=0, chunk=0):
        x = self.model(input_ids, attention_mask, hidden_states, past_length, chunk)
        if self.lm_head is None or chunk < len(self.model.chunks) - 1:
            return x
        logits = self.lm_head(x)
        return logits if labels is None else lm_loss(logits[:, :-1], labels[:, 1:])  # position t predicts t + 1

    @staticmethod
    def label_tokens(labels):
        """Tokens that carry loss: position 0 predicts nothing (labels are shifted by one)."""
        return (labels[:, 1:] != IGNORE_INDEX).sum()

    @classmethod
    def from_pretrained(cls, path, ctx=None):
        """Load a Hugging Face LLaMA directory (config.json + safetensors) into this layout."""
        model = cls(LlamaConfig.from_pretrained(path), ctx)
        model.load_hf(path)
        return model

    def load_hf(self, path, trainable_only=False, strict=True, verified=False):
        checkpoint.check_config_agrees(self.config, path, LlamaConfig.from_dict, UNSEEN_IN_SHAPES)
        return checkpoint.load_checkpoint(self, path, self.to_hf, trainable_only=trainable_only, strict=strict,
                                          verified=verified, ignore=HF_EXTRAS)

    def save_hf(self, path, trainable_only=False):
        cfg = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **vars(self.config)}, indent=1)
        checkpoint.save_checkpoint(self, self.ctx, path, self.to_hf, {"config.json": cfg}, trainable_only)
