"""JSON configs with the research prototype's key names, read into a typed, frozen Config.

A config may compose parts: {"include": ["../../model/bert_tiny.json", "../../layout/galaxy.json"]}.
A part's path is relative to the file; where nothing is there, the same path under the shipped
train_config/ is read (its leading "../" dropped), so a shipped config copied anywhere still runs.
Every key belongs to one section, a frozen dataclass defined beside the code that uses it (or, for
the packages above config, which never import it, in sections.py); its fields give each key's type,
default and one-line description (galaxy/keys.py), its __post_init__ the key's rules:

    section     class                               module
    model       the architecture's own config class  galaxy/models/<arch>/config.py (models/registry.py)
    data        DataConfig                          galaxy/data/build.py
    layout      LayoutConfig                        galaxy/plan.py
    tuning      TuningConfig                        galaxy/tuning/keys.py
    optim       OptimConfig                         galaxy/config/sections.py (for train/optim.py)
    loop        LoopConfig                          galaxy/config/sections.py (for train/loop.py)
    zero        ZeroConfig                          galaxy/config/sections.py (for train/zero.py)
    checkpoint  CheckpointConfig                    galaxy/config/sections.py (for train/checkpoint.py)
    runtime     RuntimeConfig                       galaxy/config/sections.py (for runtime/)

The prototype's aliases (pad_size, lr, lora_att_dim, ...) become the keys' names once, as a file or
an override is read. Unknown keys and wrong types are errors naming the key; a key of another
architecture (rope_theta in a BERT config) is ignored. Command-line `--key value` pairs override
the file. Reading: cfg.optim.learning_rate, or cfg["learning_rate"] (a Config is a read-only
mapping of every key); changing: cfg.replace(layout=dataclasses.replace(cfg.layout, ...)).
Loading imports the architectures' config classes, not their models.
"""
import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from galaxy.config.sections import CheckpointConfig, LoopConfig, OptimConfig, RuntimeConfig, ZeroConfig
from galaxy.data.build import DataConfig
from galaxy.errors import ConfigError
from galaxy.keys import from_keys, key
from galaxy.models.registry import MODELS
from galaxy.plan import TP, LayoutConfig
from galaxy.tuning.keys import TuningConfig, check_tuning, other_methods_keys, tuning_method

SHIPPED = Path(__file__).resolve().parents[2] / "train_config"  # the repository's configs and their parts
SECTIONS = {"data": DataConfig, "optim": OptimConfig, "loop": LoopConfig, "layout": LayoutConfig,
            "zero": ZeroConfig, "tuning": TuningConfig, "checkpoint": CheckpointConfig, "runtime": RuntimeConfig}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}  # key -> its section
ALIASES = {"pad_size": "seq_length", "max_seq_length": "seq_length", "lr": "learning_rate",
           "lora_att_dim": "lora_dim", "lora_r": "lora_dim", "grad_accum_steps": "gradient_accumulation_steps"}
PIPELINE_KEYS = ("stage_num_hidden_layers_list", "num_microbatches", "pipeline_schedule", "virtual_stages")
LAYOUT_KEYS = ("tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list", "data_parallel_size",
               *PIPELINE_KEYS)


@dataclass(frozen=True)
class _Architecture:
    """The key that picks the model section's class (galaxy.models.registry)."""
    model: str = key("bert", f"architecture: {' | '.join(MODELS)}")


@functools.cache
def model_fields(model_class):
    """The model section's own keys: its config class's fields less those other sections own (seed,
    activation_checkpointing, overlap_tiles: the model config holds copies of them)."""
    return {f.name: f for f in fields(model_class) if f.name not in SECTION_OF}


@functools.cache
def key_fields():
    """{key: its dataclass field} over every section and every architecture's config class."""
    found = {f.name: f for f in fields(_Architecture)}
    for spec in MODELS.values():
        found.update(model_fields(spec.config))
    found.update({f.name: f for cls in SECTIONS.values() for f in fields(cls)})
    return found


@dataclass(frozen=True, eq=False)
class Config(Mapping):
    """A run's configuration: the architecture's name and config class (the model section) and one
    frozen section per concern. Built by load_config; a changed one by replace()."""
    model_name: str
    model: object  # BertConfig, LlamaConfig or BartConfig
    data: DataConfig
    optim: OptimConfig
    loop: LoopConfig
    layout: LayoutConfig
    zero: ZeroConfig
    tuning: TuningConfig
    checkpoint: CheckpointConfig
    runtime: RuntimeConfig

    def __post_init__(self):
        owned = {f.name: self[f.name] for f in fields(self.model) if f.name in SECTION_OF}
        if any(getattr(self.model, k) != v for k, v in owned.items()):  # the model's copies follow their owners
            object.__setattr__(self, "model", dataclasses.replace(self.model, **owned))
        _check_across(self)

    def replace(self, **sections):
        """This config with some sections replaced (new frozen sections), checked again across sections."""
        return dataclasses.replace(self, **sections)

    def with_layout(self, **keys):
        """This config with a new layout section: the planner's, re-planning's and elastic recovery's splits."""
        return self.replace(layout=dataclasses.replace(self.layout, **keys))

    def __getitem__(self, key):
        if key == "model":
            return self.model_name
        if key in SECTION_OF:
            return getattr(getattr(self, SECTION_OF[key]), key)
        if key in model_fields(type(self.model)):
            return getattr(self.model, key)
        raise KeyError(key)

    def __iter__(self):
        yield "model"
        yield from model_fields(type(self.model))
        yield from SECTION_OF

    def __len__(self):
        return 1 + len(model_fields(type(self.model))) + len(SECTION_OF)


def describe_keys():
    """{key: its one-line description}, every section's and every architecture's."""
    return {name: f.metadata.get("doc", "") for name, f in key_fields().items()}


def _typed(key, value, kind):
    """`value` as the key's annotated type (an int where a float is wanted becomes one)."""
    if value is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == int | list[int]:  # overlap_tiles: a count or the tiles' sizes
        return _typed(key, value, list[int] if isinstance(value, list) else int)
    if kind == list[int]:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ConfigError(f"config key '{key}' must be a list of integers, got {value!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _canonical(key):
    key = ALIASES.get(key, key)
    if key not in key_fields():
        raise ConfigError(f"unknown config key '{key}'")
    return key


def _default(key):
    """A section key's default value."""
    field = key_fields()[key]
    return field.default if field.default_factory is dataclasses.MISSING else field.default_factory()


def is_config_key(name):
    """A config key or one of the prototype's aliases of one."""
    return ALIASES.get(name, name) in key_fields()


def key_type(key):
    return key_fields()[_canonical(key)].type


def parse_cli_value(key, text):
    """Turn a command-line string into the key's type (JSON for lists and booleans)."""
    kind = key_type(key)
    if kind is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"--{key} {text!r} is not a valid {kind.__name__ if isinstance(kind, type) else kind}") \
            from None


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
    """Read a JSON config and its parts (or only defaults), apply overrides, validate; return the Config."""
    keys = read_config(path) if path is not None else {}
    keys.update({_canonical(key): value for key, value in (overrides or {}).items()})
    return build_config(keys)


def build_config(keys):
    """The Config of canonical `keys` (the rest take their defaults): typed, split into sections, each
    checked by its owner, then across sections."""
    keys = {key: _typed(key, value, key_fields()[key].type) for key, value in keys.items()}
    name = keys.get("model") or "bert"
    if name not in MODELS:
        raise ConfigError(f"config key 'model' is {name!r}, expected one of {list(MODELS)}")
    sections = {section: cls(**{f.name: keys[f.name] for f in fields(cls) if f.name in keys})
                for section, cls in SECTIONS.items()}
    model_class = MODELS[name].config
    given = {key: value for key, value in keys.items() if key in model_fields(model_class)}
    model = _model_config(model_class, given)  # keys left out: the architecture's defaults (copies: Config's)
    others = {key: value for key, value in keys.items() if key not in SECTION_OF and key not in {*given, "model"}}
    _check_other_architectures(model, others)
    return Config(name, model, **sections)


def _model_config(model_class, keys):
    try:
        return from_keys(model_class, keys)
    except ValueError as e:  # LlamaConfig refuses unsupported RoPE scalings by name (a ConfigError keeps its message)
        raise ConfigError(str(e)) from None


def _check_other_architectures(model, keys):
    """Keys of another architecture (num_key_value_heads in a BERT config) are ignored, once that
    architecture's config class has checked them against this model's shape."""
    for model_class in {spec.config for spec in MODELS.values()} - {type(model)}:
        theirs = {key: value for key, value in keys.items() if key in model_fields(model_class)}
        if theirs:
            shape = {key: getattr(model, key) for key in model_fields(model_class) if hasattr(model, key)}
            _model_config(model_class, {**shape, **theirs})


def _check_across(cfg):
    """The rules that join sections."""
    if cfg.model_name == "bert" and cfg.data.seq_length < 3:
        raise ConfigError(f"config key 'seq_length' is {cfg.data.seq_length}; BERT needs >= 3 ([CLS] token [SEP])")
    limit = getattr(cfg.model, "position_limit", cfg.model.max_position_embeddings)  # LLaMA: its RoPE scaling's
    if cfg.data.seq_length > limit:
        raise ConfigError(f"seq_length {cfg.data.seq_length} exceeds max_position_embeddings "
                          f"{cfg.model.max_position_embeddings}")
    if cfg.layout.virtual_stages > 1 and (cfg.tuning.use_side or cfg.tuning.use_side_only):
        raise ConfigError(f"virtual_stages {cfg.layout.virtual_stages}: side-tuning (use_side / use_side_only) "
                          f"runs one chunk of layers per pipeline rank")  # the side network is one chunk per stage
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
        if cfg[key] != _default(key):
            idle.setdefault(reason, []).append(f"{key} {cfg[key]}")
    return [f"config key{'s' * (len(keys) > 1)} {', '.join(keys)} {'have' if len(keys) > 1 else 'has'} no effect: "
            f"{reason}" for reason, keys in idle.items()]


def config_hash(cfg):
    """Stable digest ranks compare at start-up, so ranks started with different configs stop."""
    return hashlib.sha256(json.dumps(dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
