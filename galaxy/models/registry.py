"""The config's "model" names an architecture: its config class (the model section of a config:
its keys, defaults and rules), its model class, and what it refuses before any process starts.
Its data is galaxy.data.build's, its tuning method and weight files galaxy.tuning.apply.load_sources'.

    spec = MODELS[cfg["model"]]
    model = spec.model(spec.config.from_dict(cfg), ctx)

Both classes are looked up by name when first asked for: reading a config imports the config
classes (light), not the models.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

from galaxy.errors import ConfigError


def bart_check(cfg, plan):
    if plan.pp_size > 1:
        raise ConfigError("stage_num_hidden_layers_list: BART does not support pipeline parallelism")
    if cfg["use_side"] or cfg["use_side_only"]:
        raise ConfigError("use_side / use_side_only: side-tuning reads one stack of layers (BERT, LLaMA); BART's "
                          "encoder-decoder is not supported")


def retrieval_check(cfg, plan):
    if plan.dp_size > 1 or plan.pp_size > 1:
        raise ConfigError("bert_retrieval scores each question against its batch's passages (in-batch negatives), "
                          "so every rank needs the whole batch: no data_parallel_size > 1 or pipeline stages (tp, sp, "
                          "galaxy and galaxy2 layouts do)")


def supports_every_layout(cfg, plan):
    """The check of a model that runs in every layout and tuning method."""


@dataclass(frozen=True)
class ModelSpec:
    package: str  # galaxy.models.<package>: exports the config class and the model class
    config_name: str
    model_name: str
    check: Callable = supports_every_layout  # check(cfg, plan) raises ConfigError for what the model does not support
    config = property(lambda self: self.exported(self.config_name))
    model = property(lambda self: self.exported(self.model_name))

    def exported(self, name):
        return getattr(importlib.import_module(f"galaxy.models.{self.package}"), name)


MODELS = {"bert": ModelSpec("bert", "BertConfig", "BertForMaskedLM"),
          "bert_retrieval": ModelSpec("bert", "BertConfig", "BertForRetrieval", retrieval_check),
          "llama": ModelSpec("llama", "LlamaConfig", "LlamaForCausalLM"),
          "bart": ModelSpec("bart", "BartConfig", "BartForConditionalGeneration", bart_check)}


def build_model(cfg, ctx=None):
    spec = MODELS[cfg["model"]]
    return spec.model(spec.config.from_dict(cfg), ctx)


BACKBONES = {"bert": "BertModel", "llama": "LlamaModel"}  # what inference latency is timed on


def build_backbone(cfg, ctx=None):
    """The model without its LM head (BERT's encoder, LLaMA's decoder stack with its final norm),
    initialised from cfg's seed: what the benchmarks and the planner time a forward pass of."""
    if cfg["model"] not in BACKBONES:
        raise ValueError(f"model {cfg['model']!r}: a backbone is built for {sorted(BACKBONES)}")
    from galaxy.models.common import init_weights  # torch code: not imported with the registry

    spec = MODELS[cfg["model"]]
    model = spec.exported(BACKBONES[cfg["model"]])(spec.config.from_dict(cfg), ctx)
    init_weights(model, cfg["initializer_range"], cfg["seed"])
    return model
