"""BART encoder-decoder with its LM head, written once for every layout.

Read it as a plain BART (Lewis et al. 2020, the Hugging Face `BartForConditionalGeneration`):

    shared token embeddings (x sqrt(hidden) when scale_embedding) + learned positions (offset 2)
      -> layernorm_embedding -> dropout, for the encoder and for the decoder, each with its own
         positions and LayerNorm
    encoder layer: ATT(self) -> CON -> MLP -> CON                       (post-norm, as BERT's)
    decoder layer: ATT(causal self) -> CON -> ATT(cross) -> CON -> MLP -> CON
    logits = decoder output @ shared^T + final_logits_bias

The plan says each block's method (galaxy.layers), for encoder and decoder alike. Cross-attention
takes its queries from the decoder stream and its keys/values from the encoder output, moved by
the placement table to what the attention consumes (under TP: the whole sequence on every rank,
each rank attending with its own heads). Pipeline parallelism is not supported for BART.

Parameter names are Hugging Face's outside the layers; HF_NAMES maps the layers' block names.
"""
import json
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from galaxy.layers.attention import Attention
from galaxy.layers.dropout import LayoutInvariantDropout
from galaxy.layers.mlp import MLP
from galaxy.layers.placement import redistribute
from galaxy.layers.transformer import Connective, TransformerLayer, chain, run_layers, sublayer
from galaxy.models import checkpoint
from galaxy.models.bart.config import BartConfig
from galaxy.models.bert.model import attention_bias, bert_layer
from galaxy.models.common import causal_bias, init_weights, lm_loss, on_context_device
from galaxy.plan import Method

HF_NAMES = [
    (r"\.attn\.([qkv])\.", r".self_attn.\1_proj."),
    (r"\.attn\.o\.", ".self_attn.out_proj."),
    (r"\.cross_attn\.([qkv])\.", r".encoder_attn.\1_proj."),
    (r"\.cross_attn\.o\.", ".encoder_attn.out_proj."),
    (r"\.con1\.norm\.", ".self_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.con2\.norm\.", r"\1.encoder_attn_layer_norm."),
    (r"\.con[23]\.norm\.", ".final_layer_norm."),
    (r"\.mlp\.up\.", ".fc1."),
    (r"\.mlp\.down\.", ".fc2."),
]
POSITION_OFFSET = 2  # BART's learned position table has two extra leading rows (a fairseq legacy)
to_hf = partial(checkpoint.rename, rules=HF_NAMES)


class BartDecoderLayer(nn.Module):
    """ATT(self) -> CON1 -> ATT(cross) -> CON2 -> MLP -> CON3, each joined by the placement table."""

    def __init__(self, attn, cross_attn, mlp, con1, con2, con3, plan, input_placement):
        super().__init__()
        self.attn, self.con1, self.cross_attn, self.con2, self.mlp, self.con3 = attn, con1, cross_attn, con2, mlp, con3
        self.plan, self.input_placement = plan, input_placement

    output_placement = TransformerLayer.output_placement  # what its connectives consume

    def forward(self, x, attn_bias, memory, memory_placement, memory_bias):
        plan, rest = self.plan, self.output_placement
        x = sublayer(self.attn, plan.att, self.con1, x, self.input_placement, attn_bias)
        memory = redistribute(memory, memory_placement, plan.att, self.attn.ctx)
        x = sublayer(self.cross_attn, plan.att, self.con2, x, rest, memory_bias, kv_input=memory)
        return sublayer(self.mlp, plan.mlp, self.con3, x, rest)


def decoder_layer(cfg, ctx, site, input_placement):
    """Dropout sites site..site+4, numbered so every layout draws the same masks."""
    plan, h = ctx.plan, cfg.hidden_size

    def attention(s):
        return Attention(h, cfg.num_attention_heads, plan.att, ctx, dropout_p=cfg.attention_probs_dropout_prob, site=s)

    def connective(s):
        return Connective(nn.LayerNorm(h, eps=cfg.layer_norm_eps), cfg.hidden_dropout_prob, s, plan.con, ctx)

    mlp = MLP(h, cfg.intermediate_size, plan.mlp, ctx, act=cfg.hidden_act)
    return BartDecoderLayer(attention(site), attention(site + 2), mlp, connective(site + 1), connective(site + 3),
                            connective(site + 4), plan, input_placement)


class BartStack(nn.Module):
    """Encoder or decoder: embeddings (token table passed in, since it is shared) then layers."""

    def __init__(self, cfg, layers, embed_site):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.layernorm_embedding = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = LayoutInvariantDropout(cfg.hidden_dropout_prob, embed_site)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(layers)
        self.checkpoint = cfg.activation_checkpointing

    def forward(self, ids, shared, attn_bias, extra=()):
        """Returns the last layer's output and its placement."""
        positions = torch.arange(ids.shape[1], device=ids.device) + POSITION_OFFSET
        x = self.dropout(self.layernorm_embedding(shared(ids) * self.embed_scale + self.embed_positions(positions)))
        return run_layers(self.layers, x, attn_bias, self.checkpoint, extra)


class BartModel(nn.Module):
    """Encoder + decoder; returns the decoder's last hidden states [B, T_dec, H] (replicated)."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config, self.ctx = cfg, ctx
        if self.ctx.plan.pp_size > 1:
            raise ValueError("BART does not support pipeline parallelism (stage_num_hidden_layers_list)")
        n_enc = cfg.num_hidden_layers
        self.shared = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        # dropout sites: encoder embeddings 0, encoder layer i 4i+1..4i+3 (bert_layer's numbering),
        # decoder embeddings 4*n_enc, decoder layer j the five from 4*n_enc + 1 + 5j
        self.encoder = BartStack(cfg, chain(lambda i, p: bert_layer(cfg, self.ctx, i, p), range(n_enc)), embed_site=0)
        self.decoder = BartStack(cfg, chain(lambda j, p: decoder_layer(cfg, self.ctx, 4 * n_enc + 1 + 5 * j, p),
                                            range(cfg.num_decoder_layers)), embed_site=4 * n_enc)

    def encode(self, input_ids, attention_mask=None):
        """The encoder's last hidden states [B, T, H], replicated: what encoder inference returns."""
        memory, placement, _ = self.memory(input_ids, attention_mask)
        return redistribute(memory, placement, Method.NONE, self.ctx)

    def memory(self, input_ids, attention_mask=None):
        """What the decoder's cross-attention reads: (encoder output, its placement, its padding bias)."""
        memory_bias = attention_bias(attention_mask, self.shared.weight.dtype)
        return (*self.encoder(input_ids, self.shared, memory_bias), memory_bias)

    def decode(self, decoder_input_ids, memory):
        """The decoder's last hidden states [B, T_dec, H] (replicated) over `memory` (self.memory's)."""
        causal = causal_bias(decoder_input_ids.shape[1], None, self.shared.weight.dtype, decoder_input_ids.device)
        x, placement = self.decoder(decoder_input_ids, self.shared, causal, memory)
        return redistribute(x, placement, Method.NONE, self.ctx)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        if decoder_input_ids is None:
            raise ValueError("BART needs decoder_input_ids (the target shifted right)")
        return self.decode(decoder_input_ids, self.memory(input_ids, attention_mask))


class BartForConditionalGeneration(nn.Module):
    """BART with the tied LM head. forward returns logits, or with labels (sum of token losses,
    number of label tokens), as BertForMaskedLM does, so galaxy.train.loop.Trainer trains it."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config = cfg
        self.model = BartModel(cfg, ctx)
        self.ctx = self.model.ctx
        # HF keeps this as a buffer that is never trained; a frozen parameter loads and saves with the rest
        self.final_logits_bias = nn.Parameter(torch.zeros(1, cfg.vocab_size), requires_grad=False)
        init_weights(self, cfg.initializer_range, cfg.seed)

    def lm_head(self, x):
        """Decoder hidden states -> logits over the vocabulary (the tied embedding, plus the bias)."""
        return F.linear(x, self.model.shared.weight) + self.final_logits_bias

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, labels=None):
        logits = self.lm_head(self.model(input_ids, attention_mask, decoder_input_ids))
        return logits if labels is None else lm_loss(logits, labels)

    def load_hf(self, path, trainable_only=False, strict=True, verified=False):
        checkpoint.check_config_agrees(self.config, path, BartConfig.from_hf, ("hidden_act", "scale_embedding"))
        return checkpoint.load_checkpoint(self, path, to_hf, trainable_only=trainable_only, strict=strict,
                                          verified=verified)

    def save_hf(self, path, trainable_only=False):
        cfg = json.dumps(self.config.to_hf(), indent=1)
        checkpoint.save_checkpoint(self, self.ctx, path, to_hf, {"config.json": cfg}, trainable_only)
