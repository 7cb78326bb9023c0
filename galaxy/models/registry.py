"""The config's "model" names an architecture: its config class (which owns the model's
defaults), its model class, how its data is built, and what it refuses before any process starts.

    spec = MODELS[cfg["model"]]
    model = spec.model(spec.config.from_dict(cfg), ctx)
    data = spec.build_data(cfg, ctx)
"""
from dataclasses import dataclass
from typing import Callable

from galaxy.data import (BartDenoisingData, BertPretrainData, InstructionData, PretrainTextData, RetrievalPairs,
                         SyntheticMLM, holds_tokenizer, tokenizer_from)
from galaxy.models.bart import BartConfig, BartForConditionalGeneration
from galaxy.models.bert import BertConfig, BertForMaskedLM, BertForRetrieval, BertModel
from galaxy.models.common import init_weights
from galaxy.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from galaxy.tuning.apply import apply_tuning


DEFAULT_TOKENIZER = "data/python_docs/spm_bert.model"


def tokenizer_path(cfg):
    """tokenizer_file; else the tokenizer a load_checkpoint directory brings; else the shipped one."""
    if cfg["tokenizer_file"]:
        return cfg["tokenizer_file"]
    if cfg["load_checkpoint"] and holds_tokenizer(cfg["load_checkpoint"]):
        return cfg["load_checkpoint"]
    return DEFAULT_TOKENIZER


def load_tokenizer(cfg):
    path = tokenizer_path(cfg)
    tok = tokenizer_from(path)
    if tok.vocab_size > cfg["vocab_size"]:
        raise SystemExit(f"galaxy: tokenizer {path} has {tok.vocab_size} pieces, "
                         f"config vocab_size is {cfg['vocab_size']}")
    return tok


def bert_data(cfg, ctx):
    if cfg["data"] == "synthetic":
        return SyntheticMLM(cfg["vocab_size"], cfg["seq_length"], cfg["seed"])
    return BertPretrainData(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"], cfg["seed"])


def llama_data(cfg, ctx):
    tok = load_tokenizer(cfg)
    if cfg["data"] == "instruction":  # sequence shards and pipeline stages need every batch at seq_length
        fixed = ctx.plan.seq_sharded or ctx.plan.pp_size > 1
        return InstructionData(cfg["data_file"], tok, cfg["seq_length"], pad_to_max_length=fixed)
    if cfg["data"] == "corpus":
        return PretrainTextData(cfg["data_file"], tok, cfg["seq_length"])
    raise SystemExit(f"galaxy: data '{cfg['data']}' is not available for LLaMA; use instruction or corpus")


def bart_data(cfg, ctx):
    return BartDenoisingData(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"], cfg["seed"])


def bart_check(cfg, plan):
    if cfg["data"] != "corpus":
        raise SystemExit(f"galaxy: config error: BART trains on the corpus (data 'corpus'), config says {cfg['data']!r}")
    if plan.pp_size > 1:
        raise SystemExit("galaxy: config error: stage_num_hidden_layers_list: BART does not support pipeline parallelism")
    if cfg["use_side"] or cfg["use_side_only"]:
        raise SystemExit("galaxy: config error: use_side / use_side_only: side-tuning reads one stack of layers "
                         "(BERT, LLaMA); BART's encoder-decoder is not supported")


def supports_every_layout(cfg, plan):
    """The check of a model that runs in every layout and tuning method."""


@dataclass(frozen=True)
class ModelSpec:
    config: type
    model: type
    build_data: Callable
    check: Callable = supports_every_layout  # check(cfg, plan) raises SystemExit for what the model does not support
    evaluate: Callable = None  # evaluate(model, cfg, ctx) -> a line, run by every rank before and after training


def retrieval_data(cfg, ctx):
    return RetrievalPairs(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"])


def retrieval_check(cfg, plan):
    if plan.dp_size > 1 or plan.pp_size > 1:
        raise SystemExit("galaxy: config error: bert_retrieval scores each question against its batch's passages "
                         "(in-batch negatives), so every rank needs the whole batch: no data_parallel_size > 1 or "
                         "pipeline stages (tp, sp, galaxy and galaxy2 layouts do)")


def retrieval_eval(model, cfg, ctx):
    held_out = RetrievalPairs(cfg["data_file"], load_tokenizer(cfg), cfg["seq_length"], held_out=True)
    return f"recall@1 on the {len(held_out)} held-out pairs of {cfg['data_file']}: {model.recall_at_1(held_out):.3f}"


MODELS = {"bert": ModelSpec(BertConfig, BertForMaskedLM, bert_data),
          "bert_retrieval": ModelSpec(BertConfig, BertForRetrieval, retrieval_data, retrieval_check, retrieval_eval),
          "llama": ModelSpec(LlamaConfig, LlamaForCausalLM, llama_data),
          "bart": ModelSpec(BartConfig, BartForConditionalGeneration, bart_data, bart_check)}


def build_model(cfg, ctx=None):
    spec = MODELS[cfg["model"]]
    return spec.model(spec.config.from_dict(cfg), ctx)


def load_sources(model, cfg, ctx, verified=False):
    """Fill a built model from the run's sources, in order: load_checkpoint's weights (over the
    seed's, drawn as it was built), the tuning method (which adds and initialises its parameters
    and freezes the rest), load_trainable's weights. `verified`: these files passed the whole
    model's checks at start-up, so only this model's own slices are read (galaxy.relayout's
    rebuilt part of a lost rank). Returns (what load_checkpoint skipped, the tuning line)."""
    skipped = []
    if cfg["load_checkpoint"] and not cfg["resume"]:
        skipped = model.load_hf(cfg["load_checkpoint"], strict=cfg["strict"], verified=verified)
    tuning = apply_tuning(model, cfg, ctx)  # LoRA / adapter / side: freezes the rest
    if cfg["load_trainable"] and not cfg["resume"]:  # their parameters exist only now
        model.load_hf(cfg["load_trainable"], trainable_only=True, verified=verified)
    return skipped, tuning


BACKBONES = {"bert": BertModel, "llama": LlamaModel}  # what inference latency is timed on


def build_backbone(cfg, ctx=None):
    """The model without its LM head (BERT's encoder, LLaMA's decoder stack with its final norm),
    initialised from cfg's seed: what the benchmarks and the planner time a forward pass of."""
    if cfg["model"] not in BACKBONES:
        raise ValueError(f"model {cfg['model']!r}: a backbone is built for {sorted(BACKBONES)}")
    spec = MODELS[cfg["model"]]
    model = BACKBONES[cfg["model"]](spec.config.from_dict(cfg), ctx)
    init_weights(model, cfg["initializer_range"], cfg["seed"])
    return model
