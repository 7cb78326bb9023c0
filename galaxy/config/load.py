"""JSON configs with the research prototype's key names, validated in one place.

A config may compose parts: {"include": ["../../model/bert_tiny.json", "../../layout/galaxy.json"]}.
A part's path is relative to the file; where nothing is there, the same path under the shipped
train_config/ is read (its leading "../" dropped), so a shipped config copied anywhere still runs.
Every key has a type and a default (model keys: the architecture's, galaxy/models/registry.py);
unknown keys and wrong types are errors naming the key. Command-line `--key value` pairs
override the file. Aliases keep old names working.
"""
import hashlib
import itertools
import json
from dataclasses import fields
from pathlib import Path

from galaxy.errors import ConfigError
from galaxy.models.llama.config import LlamaConfig
from galaxy.models.registry import MODELS
from galaxy.plan import TP, check_kv_heads
from galaxy.seeding import DEFAULT_SEED
from galaxy.tuning.keys import check_tuning, other_methods_keys, tuning_method

INT_LIST = "list[int]"
SHIPPED = Path(__file__).resolve().parents[2] / "train_config"  # the repository's configs and their parts

# key: (type, default, meaning)
SCHEMA = {
    # model: None takes the architecture's own default (its config class in galaxy/models/*/)
    "model": (str, "bert", "architecture: bert | llama | bart"),
    "hidden_size": (int, None, ""),
    "intermediate_size": (int, None, ""),
    "num_attention_heads": (int, None, ""),
    "num_key_value_heads": (int, None, "GQA key/value heads (LLaMA); default = num_attention_heads"),
    "num_hidden_layers": (int, None, ""),
    "num_decoder_layers": (int, None, "BART decoder layers; default = num_hidden_layers"),
    "vocab_size": (int, None, ""),
    "type_vocab_size": (int, None, ""),
    "max_position_embeddings": (int, None, ""),
    "hidden_dropout_prob": (float, None, ""),
    "attention_probs_dropout_prob": (float, None, ""),
    "layer_norm_eps": (float, None, ""),
    "rms_norm_eps": (float, None, ""),
    "rope_theta": (float, None, ""),
    "rope_scaling": (dict, None, "LLaMA RoPE scaling as Hugging Face writes it, e.g. {\"rope_type\": \"linear\", "
                     "\"factor\": 4.0}; rope_type linear | dynamic | llama3 (default: plain RoPE)"),
    "head_dim": (int, None, "LLaMA width of one attention head; default = hidden_size / num_attention_heads"),
    "tie_word_embeddings": (bool, None, "share input embeddings with the output head"),
    "scale_embedding": (bool, None, "BART: multiply token embeddings by sqrt(hidden_size)"),
    "initializer_range": (float, None, ""),
    "hidden_act": (str, None, ""),
    # data
    "train": (bool, True, "train (true) or only run the forward pass (false)"),
    "data": (str, "corpus", "corpus | synthetic | instruction"),
    "data_file": (str, "data/python_docs/pretrain.jsonl", ""),
    "tokenizer_file": (str, None, "a SentencePiece .model, a Hugging Face tokenizer.json or BERT vocab.txt, or "
                       "a directory holding one (default: load_checkpoint's directory when it holds one, else "
                       "data/python_docs/spm_bert.model)"),
    "seq_length": (int, 128, "tokens per sequence (alias: pad_size, max_seq_length)"),
    "batch_size": (int, 8, "global batch size per optimizer micro-step"),
    # optimisation
    "learning_rate": (float, 5e-4, "(alias: lr)"),
    "weight_decay": (float, 0.01, ""),
    "adam_beta1": (float, 0.9, ""),
    "adam_beta2": (float, 0.999, ""),
    "adam_eps": (float, 1e-8, ""),
    "warmup_steps": (int, 10, ""),
    "lr_scheduler": (str, "linear", "linear | cosine | constant"),
    "gradient_accumulation_steps": (int, 1, ""),
    "max_grad_norm": (float, 1.0, "0 disables clipping"),
    "num_epochs": (int, 1, ""),
    "max_steps": (int, None, "optimizer steps; default = one pass of num_epochs"),
    "seed": (int, DEFAULT_SEED, "initial weights, data order and masking, dropout masks derive from it"),
    "dtype": (str, "fp32", "fp32 | bf16 (autocast; fp32 master weights) | bf16_pure (bf16 parameters and "
              "optimizer state)"),
    "activation_checkpointing": (bool, False, ""),
    "log_every": (int, 1, ""),
    "on_nonfinite": (str, "stop", "a step with a non-finite loss or gradient norm: stop the run, or skip "
                     "its optimizer step and go on"),
    # tuning method: exactly one true
    "full_model": (bool, True, ""),
    "use_lora": (bool, False, ""),
    "lora_dim": (int, 8, "LoRA rank r (alias: lora_att_dim, lora_r)"),
    "lora_alpha": (float, 32.0, ""),
    "lora_dropout": (float, 0.0, ""),
    "fan_in_fan_out": (bool, False, ""),
    "merge_weights": (bool, False, ""),
    "lora_targets": (list, ["query", "value"], "projections that get LoRA"),
    "use_adapter": (bool, False, ""),
    "adapter_reduction_dim": (int, 16, ""),
    "non_linearity": (str, "relu", ""),
    "use_side": (bool, False, ""),
    "use_side_only": (bool, False, ""),
    "side_reduction_factor": (int, 8, ""),
    "add_bias_sampling": (bool, True, ""),
    # layout
    "parallel": (str, None, "serial | tp | sp | dp | galaxy | galaxy2 | pp"),
    "att_parallel_method": (str, None, "TP | SP | NONE"),
    "con_parallel_method": (str, None, "SP | NONE"),
    "mlp_parallel_method": (str, None, "TP | SP | NONE"),
    "tp_num_attention_heads_list": (INT_LIST, None, ""),
    "tp_intermediate_size_list": (INT_LIST, None, ""),
    "seq_scatter_list": (INT_LIST, None, ""),
    "stage_num_hidden_layers_list": (INT_LIST, None, ""),
    "data_parallel_size": (int, None, ""),
    "num_microbatches": (int, 1, ""),
    "pipeline_schedule": (str, "1f1b", "gpipe | 1f1b | zb-h1 | interleaved-1f1b"),
    "virtual_stages": (int, 1, "chunks of layers per pipeline rank (interleaved-1f1b)"),
    "overlap_tiles": (int, 1, "tiles for comm/compute overlap; 1 = off"),
    "bucket_size_mb": (float, 25.0, "gradient all-reduce bucket size"),
    "replan": (dict, None, "re-plan the head/column/position split while running when a rank's speed drifts: "
               "{\"threshold\": 0.25, \"patience\": 3, \"warmup\": 1} (any of them; {} = these); "
               "galaxy.planner.replan"),
    "zero_stage": (int, 0, "ZeRO over the data-parallel group: 1 shards AdamW state, 2 also gradients, "
                   "3 also parameters; 0 = off"),
    "zero_shard_list": (list, None, "ZeRO: fraction of every sharded tensor each data-parallel rank holds, "
                        "e.g. [0.5, 0.3, 0.2]; default even"),
    "memory_mb": (INT_LIST, None, "each data-parallel rank's memory in MiB: ZeRO shards in proportion "
                  "(instead of zero_shard_list)"),
    "memory_report": (bool, False, "each rank prints its model state at start-up and the peak of its second "
                      "step beside galaxy.profiler.memory's prediction (a meta build of the rank: seconds)"),
    # processes
    "init_method": (str, None, "e.g. tcp://127.0.0.1:23000"),
    "distributed_backend": (str, None, "gloo | nccl (default: nccl on CUDA, else gloo)"),
    "device": (str, None, "cpu | cuda | cuda:N (default: cuda:<local rank> under nccl, else cpu)"),
    "timeout_s": (float, 300.0, "collective / rendezvous timeout"),
    "elastic": (bool, False, "a one-command local spawn restarts its surviving ranks when one dies: re-planned "
                "for the smaller world, training resumes from the latest checkpoint (galaxy.runtime.elastic)"),
    "elastic_restarts": (int, 3, "--elastic: at most this many restarts"),
    "save_on_signal": (bool, False, "on SIGTERM/SIGINT every rank stops at the same step and saves a "
                       "training checkpoint to save_dir before it exits"),
    # checkpoints
    "load_checkpoint": (str, None, "a Hugging Face directory or safetensors file to start from"),
    "strict": (bool, True, "load_checkpoint must hold exactly the model's tensors; false loads those that "
               "match and lists the tensors missing and unused"),
    "save_dir": (str, None, "training checkpoints go to save_dir/step-N/; the final HF export to save_dir"),
    "save_every": (int, 0, "save a training checkpoint every N optimizer steps (and at the last); 0 = never"),
    "keep_checkpoints": (int, 0, "keep only the newest K training checkpoints; 0 = keep all"),
    "resume": (bool, False, "continue from the newest complete checkpoint in save_dir"),
    "save_trainable_only": (bool, False, "the final export holds only the trained tensors (LoRA / adapter / "
                            "side), with tuning.json beside them"),
    "load_trainable": (str, None, "a save_trainable_only directory, loaded after load_checkpoint once the "
                       "tuning method has added its parameters (its tuning.json must match this run's)"),
}
ALIASES = {"pad_size": "seq_length", "max_seq_length": "seq_length", "lr": "learning_rate",
           "lora_att_dim": "lora_dim", "lora_r": "lora_dim", "grad_accum_steps": "gradient_accumulation_steps"}
TUNING_KEYS = ("full_model", "use_lora", "use_adapter", "use_side", "use_side_only")
PIPELINE_KEYS = ("stage_num_hidden_layers_list", "num_microbatches", "pipeline_schedule", "virtual_stages")
LAYOUT_KEYS = ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list", "data_parallel_size",
               *PIPELINE_KEYS)


def _check_type(key, value, kind):
    if value is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == INT_LIST:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ConfigError(f"config key '{key}' must be a list of integers, got {value!r}")
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _canonical(key):
    key = ALIASES.get(key, key)
    if key not in SCHEMA:
        raise ConfigError(f"unknown config key '{key}'")
    return key


def parse_cli_value(key, text):
    """Turn a command-line string into the key's type (JSON for lists and booleans)."""
    kind = SCHEMA[_canonical(key)][0]
    if kind is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"--{key} {text!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def part_path(config, part):
    """Where `config`'s include `part` is: beside the file, else the same path under SHIPPED with its
    leading "../" dropped (a copy of train_config/bert/full.json anywhere finds ../model/bert_tiny.json)."""
    beside = config.parent / part
    shipped = SHIPPED.joinpath(*itertools.dropwhile(lambda name: name == "..", Path(part).parts))
    tried = dict.fromkeys((beside, shipped))  # one place for an absolute part
    found = next((candidate for candidate in tried if candidate.is_file()), None)
    if found is None:
        raise ConfigError(f"config file {config} includes {part}, but there is no {' nor '.join(map(str, tried))}")
    return found


def read_config(path, _outer=()):
    """One JSON object, after its "include" list of config parts (each found by part_path), read
    in order; later parts and then the file's own keys win. Keys come back canonical.
    `_outer`: the files that include this one, outermost first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    outer = [p.resolve() for p in _outer]
    if path.resolve() in outer:
        cycle = [*_outer[outer.index(path.resolve()):], path]
        chain = " -> ".join(map(str, cycle))
        raise ConfigError(f"config file {path} includes itself ({chain})" if len(cycle) == 2
                          else f"config files include each other in a cycle: {chain}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold one JSON object")
    merged, parts = {}, raw.pop("include", [])
    for part in [parts] if isinstance(parts, str) else parts:
        merged.update(read_config(part_path(path, part), (*_outer, path)))
    merged.update({_canonical(key): value for key, value in raw.items()})
    return merged


def load_config(path=None, overrides=None):
    """Read a JSON config and its parts (or only defaults), apply overrides, validate; return a plain dict."""
    raw = read_config(path) if path is not None else {}
    cfg = {key: spec[1] for key, spec in SCHEMA.items()}
    for source in (raw, overrides or {}):
        for key, value in source.items():
            canon = _canonical(key)
            cfg[canon] = _check_type(canon, value, SCHEMA[canon][0])
    if cfg["model"] not in MODELS:
        raise ConfigError(f"config key 'model' is {cfg['model']!r}, expected one of {list(MODELS)}")
    for f in fields(MODELS[cfg["model"]].config):  # keys left out take the architecture's defaults
        if f.name in SCHEMA and cfg[f.name] is None:
            cfg[f.name] = f.default
    _check_rules(cfg)
    return cfg


def _check_rules(cfg):
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                "seq_length", "batch_size", "gradient_accumulation_steps", "num_microbatches", "overlap_tiles",
                "virtual_stages"):
        if cfg[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {cfg[key]}")
    for key in ("save_every", "keep_checkpoints", "warmup_steps", "num_epochs"):
        if cfg[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {cfg[key]}")
    for key in ("max_steps", "log_every", "elastic_restarts"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {cfg[key]}")
    for key in ("learning_rate", "weight_decay", "max_grad_norm"):
        if cfg[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {cfg[key]}")
    for key in ("timeout_s", "bucket_size_mb", "adam_eps", "layer_norm_eps", "initializer_range"):
        if cfg[key] is not None and not cfg[key] > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {cfg[key]}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {cfg[key]}")
    if cfg["model"] == "bert" and cfg["seq_length"] < 3:
        raise ConfigError(f"config key 'seq_length' is {cfg['seq_length']}; BERT needs >= 3 ([CLS] token [SEP])")
    if cfg["memory_report"] and cfg["max_steps"] == 1:
        raise ConfigError("config key 'memory_report' measures the second step (the first creates AdamW's state), "
                          "but max_steps is 1")
    for key in ("resume", "save_every", "save_on_signal"):
        if cfg[key] and not cfg["save_dir"]:
            raise ConfigError(f"config key '{key}' is {cfg[key]!r} but save_dir is not set; "
                              f"training checkpoints live in save_dir")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads "
                          f"{cfg['num_attention_heads']}")
    check_kv_heads(cfg["num_attention_heads"], cfg["num_key_value_heads"])
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "lora_dropout"):
        if cfg[key] is not None and not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {cfg[key]}")
    choices = {"data": ("corpus", "synthetic", "instruction"),
               "lr_scheduler": ("linear", "cosine", "constant"), "dtype": ("fp32", "bf16", "bf16_pure"),
               "pipeline_schedule": ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b"), "on_nonfinite": ("stop", "skip"),
               "distributed_backend": ("gloo", "nccl", None)}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"config key '{key}' is {cfg[key]!r}, expected one of {[a for a in allowed if a]}")
    _check_positions(cfg)
    _check_virtual_stages(cfg)
    _check_zero(cfg)
    if cfg["device"] is not None and cfg["device"].split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'device' is {cfg['device']!r}, expected cpu, cuda or cuda:N")
    methods = [k for k in TUNING_KEYS[1:] if cfg[k]]
    if len(methods) > 1:
        raise ConfigError(f"tuning methods {methods} are all true; set exactly one of {list(TUNING_KEYS)}")
    cfg["full_model"] = not methods  # a PEFT method switches full-model tuning off
    check_tuning(cfg)


def idle_keys(cfg, plan):
    """Warnings (lines) for the keys set to other than their default that have no effect under the
    rest of the config and `plan`. Warnings, not errors: the prototype's flat configs carry every
    method's keys, and a layout's recipe run at world 1 is the serial reference."""
    why = {key: f"the tuning method is {tuning_method(cfg)}" for key in other_methods_keys(cfg)}
    if plan.world == 1:
        why.update(dict.fromkeys(LAYOUT_KEYS, "world 1 runs the serial model, whatever the layout"))
    else:
        if plan.att is not TP:
            why["tp_num_attention_heads_list"] = f"attention heads are not split (ATT={plan.att})"
        if plan.mlp is not TP:
            why["tp_intermediate_size_list"] = f"MLP columns are not split (MLP={plan.mlp})"
        if not plan.seq_sharded:
            why["seq_scatter_list"] = f"no block splits sequence positions (ATT={plan.att} CON={plan.con} MLP={plan.mlp})"
        if plan.pp_size == 1:
            why.update(dict.fromkeys(PIPELINE_KEYS, "there are no pipeline stages (stage_num_hidden_layers_list)"))
    if not cfg["save_every"]:
        why["keep_checkpoints"] = "save_every is 0: no training checkpoints are written"
    if not cfg["elastic"]:
        why["elastic_restarts"] = "elastic is off"
    idle = {}
    for key, reason in why.items():
        if cfg[key] != SCHEMA[key][1]:
            idle.setdefault(reason, []).append(f"{key} {cfg[key]}")
    return [f"config key{'s' * (len(keys) > 1)} {', '.join(keys)} {'have' if len(keys) > 1 else 'has'} no effect: "
            f"{reason}" for reason, keys in idle.items()]


def _check_virtual_stages(cfg):
    if cfg["virtual_stages"] == 1:
        return
    if cfg["pipeline_schedule"] != "interleaved-1f1b":
        raise ConfigError(f"virtual_stages {cfg['virtual_stages']} needs pipeline_schedule 'interleaved-1f1b', "
                          f"not {cfg['pipeline_schedule']!r}")
    if cfg["use_side"] or cfg["use_side_only"]:  # the side network is built as one chunk per stage
        raise ConfigError(f"virtual_stages {cfg['virtual_stages']}: side-tuning (use_side / use_side_only) runs "
                          f"one chunk of layers per pipeline rank")


def _check_zero(cfg):
    """What needs no plan (galaxy.train.zero.check_zero checks the rest against the replicas)."""
    if cfg["zero_stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'zero_stage' is {cfg['zero_stage']}, expected 0, 1, 2 or 3")
    fractions = cfg["zero_shard_list"]
    if cfg["memory_mb"] is not None:
        if fractions is not None:
            raise ConfigError("config keys 'zero_shard_list' and 'memory_mb' both set how ZeRO shards; set one")
        if any(m < 1 for m in cfg["memory_mb"]):
            raise ConfigError(f"config key 'memory_mb' must hold positive sizes in MiB, got {cfg['memory_mb']}")
    if fractions is None:
        return
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in fractions):
        raise ConfigError(f"config key 'zero_shard_list' must hold positive fractions, got {fractions!r}")
    if abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"config key 'zero_shard_list' {fractions} sums to {sum(fractions):g}, not 1")


def _check_positions(cfg):
    """seq_length within the positions the model learned (LLaMA too: its rotary would run past them)."""
    limit = cfg["max_position_embeddings"]
    if cfg["model"] == "llama":
        try:
            limit = LlamaConfig.from_dict(cfg).position_limit  # also refuses unsupported RoPE scalings by name
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg["seq_length"] > limit:
        raise ConfigError(f"seq_length {cfg['seq_length']} exceeds max_position_embeddings {cfg['max_position_embeddings']}")


def config_hash(cfg):
    """Stable digest ranks compare at start-up, so ranks started with different configs stop."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
