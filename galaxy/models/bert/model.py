"""BERT encoder and masked-LM head, written once for every layout.

Read it as a plain BERT: embeddings -> N x (ATT, CON1, MLP, CON2) -> MLM head. The
ParallelContext's plan decides, per block, which heads / columns / positions this rank
builds and computes (galaxy.layers); with the default context it is the serial model.
Under pipeline parallelism a rank builds only its stage: embeddings on the first,
its own layers, the head on the last.

Parameter names are ours; HF_NAMES maps them to Hugging Face's for checkpoints.
"""
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from galaxy.layers.attention import Attention
from galaxy.layers.dropout import LayoutInvariantDropout, set_part
from galaxy.layers.mlp import MLP
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.placement import redistribute
from galaxy.layers.transformer import Connective, TransformerLayer, build_chunks, run_layers
from galaxy.models import checkpoint
from galaxy.models.bert.config import BertConfig
from galaxy.models.common import init_weights, lm_loss, on_context_device
from galaxy.plan import Method

HF_NAMES = [
    (r"\.attn\.q\.", ".attention.self.query."),
    (r"\.attn\.k\.", ".attention.self.key."),
    (r"\.attn\.v\.", ".attention.self.value."),
    (r"\.attn\.o\.", ".attention.output.dense."),
    (r"\.con1\.norm\.", ".attention.output.LayerNorm."),
    (r"\.mlp\.up\.", ".intermediate.dense."),
    (r"\.mlp\.down\.", ".output.dense."),
    (r"\.con2\.norm\.", ".output.LayerNorm."),
]


# what Hugging Face's BERT checkpoints carry for parts this model leaves out (pooler, next-sentence
# head, the position_ids buffer) or holds once (the decoder, tied to the word embeddings)
HF_EXTRAS = (r"pooler\.", r"position_ids$", r"^cls\.seq_relationship\.", r"^cls\.predictions\.decoder\.")
to_hf = partial(checkpoint.rename, rules=HF_NAMES)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = LayoutInvariantDropout(cfg.hidden_dropout_prob, site=0)

    def forward(self, input_ids, token_type_ids=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def bert_layer(cfg, ctx, index, input_placement):
    """One encoder layer; dropout sites are numbered by layer so every layout draws the same masks."""
    plan, h = ctx.plan, cfg.hidden_size
    attn = Attention(h, cfg.num_attention_heads, plan.att, ctx,
                     dropout_p=cfg.attention_probs_dropout_prob, site=4 * index + 1)
    mlp = MLP(h, cfg.intermediate_size, plan.mlp, ctx, act=cfg.hidden_act)
    con1 = Connective(nn.LayerNorm(h, eps=cfg.layer_norm_eps), cfg.hidden_dropout_prob, 4 * index + 2, plan.con, ctx)
    con2 = Connective(nn.LayerNorm(h, eps=cfg.layer_norm_eps), cfg.hidden_dropout_prob, 4 * index + 3, plan.con, ctx)
    return TransformerLayer(attn, mlp, con1, con2, plan, input_placement, overlap_tiles=cfg.overlap_tiles)


class BertEncoder(nn.Module):
    def __init__(self, cfg, ctx):
        super().__init__()
        self.layer, self.chunks = build_chunks(ctx, lambda i, placement: bert_layer(cfg, ctx, i, placement))
        self.checkpoint = cfg.activation_checkpointing

    def forward(self, x, attn_bias, chunk=0):
        """Run the layers of `chunk` (a pipeline rank's chunk c under interleaved 1F1B; else all)."""
        return run_layers([self.layer[i] for i in self.chunks[chunk]], x, attn_bias, self.checkpoint)


def attention_bias(attention_mask, dtype):
    """[B, T] of 1 (attend) / 0 (padding) -> additive [B, 1, 1, T]; None when nothing is masked."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BertModel(nn.Module):
    """Embeddings + encoder; returns the last hidden states [B, T, H] (replicated on every rank)."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config, self.ctx = cfg, ctx
        self.embeddings = BertEmbeddings(cfg) if self.ctx.is_first_stage else None
        self.encoder = BertEncoder(cfg, self.ctx)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, hidden_states=None, chunk=0):
        x = self.embeddings(input_ids, token_type_ids) if self.embeddings is not None and chunk == 0 else hidden_states
        x, placement = self.encoder(x, attention_bias(attention_mask, x.dtype), chunk=chunk)
        return redistribute(x, placement, Method.NONE, self.ctx)

    @classmethod
    def from_pretrained(cls, path, ctx=None):
        """Load a Hugging Face BERT directory (config.json + safetensors) into this layout."""
        model = cls(BertConfig.from_dict(json.loads((Path(path) / "config.json").read_text())), ctx)
        model.load_hf(path)
        return model

    def load_hf(self, path, strict=True):
        return checkpoint.load_checkpoint(self, path, to_hf, strip_prefix="bert.", strict=strict, ignore=HF_EXTRAS)


class BertLMHead(nn.Module):
    def __init__(self, cfg, word_embeddings):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if word_embeddings is not None:
            self.decoder_weight = word_embeddings.weight
        else:  # a pipeline's last stage holds its own copy; it starts equal to the embeddings
            self.decoder_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
            set_spec(self.decoder_weight, grad_sum=GradSum.TIED, init_name="bert.embeddings.word_embeddings.weight")
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return F.linear(self.LayerNorm(F.gelu(self.dense(x))), self.decoder_weight, self.bias)


LM_HEAD_NAMES = [(r"^cls\.dense\.", "cls.predictions.transform.dense."),
                 (r"^cls\.LayerNorm\.", "cls.predictions.transform.LayerNorm."),
                 (r"^cls\.decoder_weight$", "cls.predictions.decoder.weight"),
                 (r"^cls\.bias$", "cls.predictions.bias")]
mlm_to_hf = partial(checkpoint.rename, rules=LM_HEAD_NAMES + HF_NAMES)  # the head's rules match only "cls." names


class BertForMaskedLM(nn.Module):
    """BERT with the masked-LM head. forward returns (sum of token losses, number of label tokens),
    so callers can divide by the count of the *global* batch and match serial exactly."""

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, ctx)
        self.ctx = self.bert.ctx
        tied = self.bert.embeddings.word_embeddings if self.bert.embeddings is not None else None
        self.cls = BertLMHead(cfg, tied) if self.ctx.is_last_stage else None
        if self.cls is None and tied is not None:  # the last stage's head holds a copy of the word embeddings
            set_spec(tied.weight, has_tied_copy=True)
        init_weights(self, cfg.initializer_range, cfg.seed)

    @property
    def side_backbone(self):
        """The module whose output a side network (side-tuning) replaces or adds to."""
        return self.bert

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, hidden_states=None,
                chunk=0):
        x = self.bert(input_ids, attention_mask, token_type_ids, hidden_states, chunk)
        if self.cls is None or chunk < self.ctx.plan.virtual_stages - 1:
            return x
        logits = self.cls(x)
        return logits if labels is None else lm_loss(logits, labels)

    def load_hf(self, path, trainable_only=False, strict=True, verified=False):
        checkpoint.check_config_agrees(self.config, path, BertConfig.from_dict, ("layer_norm_eps", "hidden_act"))
        # a bare BertModel checkpoint (all-MiniLM-L6-v2) names its tensors without "bert." and has no MLM head:
        # the head stays as initialised, as in transformers' BertForMaskedLM.from_pretrained
        return checkpoint.load_checkpoint(self, path, mlm_to_hf, strip_prefix="bert.", trainable_only=trainable_only,
                                          strict=strict, verified=verified, ignore=HF_EXTRAS,
                                          optional=() if trainable_only else (r"^'cls\.",))

    def save_hf(self, path, trainable_only=False):
        cfg = json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert", **vars(self.config)}, indent=1)
        checkpoint.save_checkpoint(self, self.ctx, path, mlm_to_hf, {"config.json": cfg}, trainable_only)


def retrieval_to_hf(name):
    """BertForRetrieval's names as a Hugging Face BertModel's (no "bert." prefix)."""
    return to_hf(name).removeprefix("bert.")


def sentence_embedding(hidden, attention_mask):
    """The token states' mean over the attention mask, L2-normalised: sentence-transformers' pooling
    and normalisation for all-MiniLM-L6-v2."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


class BertForRetrieval(nn.Module):
    """BERT sentence embeddings trained for retrieval with in-batch negatives: question i's
    embedding scores every passage of the batch (cosine x SCALE) and the loss is the cross-entropy
    of its own passage, as sentence-transformers' MultipleNegativesRankingLoss. forward returns
    (sum over questions, number of questions). Questions and passages run as two forwards of the same
    sample rows, drawing their dropout masks as two halves of one batch (independent, as two batches
    of sentence-transformers are)."""

    SCALE = 20.0

    @on_context_device
    def __init__(self, cfg, ctx=None):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, ctx)
        self.ctx = self.bert.ctx
        init_weights(self, cfg.initializer_range, cfg.seed)

    side_backbone = BertForMaskedLM.side_backbone  # the encoder, as for the masked LM

    @staticmethod
    def label_tokens(labels):
        return labels.numel()  # each question counts once

    def embed(self, input_ids, attention_mask=None):
        if attention_mask is None:  # every position counts
            attention_mask = torch.ones_like(input_ids)
        return sentence_embedding(self.bert(input_ids, attention_mask), attention_mask)

    def forward(self, query_ids, query_mask, passage_ids, passage_mask, labels):
        with set_part(self, 0, 2):
            queries = self.embed(query_ids, query_mask)
        with set_part(self, 1, 2):
            passages = self.embed(passage_ids, passage_mask)
        scores = self.SCALE * queries @ passages.T
        return F.cross_entropy(scores.float(), labels, reduction="sum"), labels.numel()

    @torch.no_grad()
    def recall_at_1(self, pairs, batch_size=64):
        """The fraction of `pairs`' questions (galaxy.data.RetrievalPairs) whose nearest passage, of
        all the pairs' passages, is their own. Every rank of the layout runs it (it is a forward)."""
        training, _ = self.training, self.eval()
        def embed_all(texts):
            return torch.cat([self.embed(*(t.to(self.ctx.device) for t in pairs.encode(texts[i:i + batch_size])))
                              for i in range(0, len(texts), batch_size)])
        nearest = (embed_all(pairs.queries) @ embed_all(pairs.passages).T).argmax(dim=1)
        self.train(training)
        return (nearest == torch.arange(len(pairs), device=nearest.device)).float().mean().item()

    def evaluate(self, held_out):
        return f"recall@1 on {len(held_out)} held-out pairs: {self.recall_at_1(held_out):.3f}"

    def load_hf(self, path, trainable_only=False, strict=True, verified=False):
        """A Hugging Face BertModel directory (all-MiniLM-L6-v2's names have no "bert." prefix)."""
        checkpoint.check_config_agrees(self.config, path, BertConfig.from_dict, ("layer_norm_eps", "hidden_act"))
        return checkpoint.load_checkpoint(self, path, retrieval_to_hf, trainable_only=trainable_only, strict=strict,
                                          verified=verified, ignore=HF_EXTRAS)

    def save_hf(self, path, trainable_only=False):
        """As a Hugging Face BertModel (the names transformers' AutoModel and sentence-transformers read)."""
        cfg = json.dumps({"architectures": ["BertModel"], "model_type": "bert", **vars(self.config)}, indent=1)
        checkpoint.save_checkpoint(self, self.ctx, path, retrieval_to_hf, {"config.json": cfg}, trainable_only)
