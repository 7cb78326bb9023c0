"""The tuning keys (TuningConfig, the tuning section of a config): which method a config picks, the
rules its keys follow, and tuning.json, the record of them written beside a trainable-only
checkpoint (like PEFT's adapter_config.json) and checked when one is loaded. Light on purpose:
galaxy.config.load imports it without the models."""
import json
from dataclasses import dataclass
from pathlib import Path

from galaxy.adapters.utils import ACTIVATIONS
from galaxy.keys import key, probability, settle
from galaxy.errors import ConfigError

# config name (Hugging Face BERT's module name) -> (block, projection) in our layers
LORA_TARGETS = {"query": ("attn", "q"), "key": ("attn", "k"), "value": ("attn", "v"),
                "dense": ("attn", "o"), "intermediate": ("mlp", "up"), "output": ("mlp", "down")}
# the keys that decide which tensors a method adds and what they compute (not how they train)
METHOD_KEYS = {"full_model": (), "use_lora": ("lora_dim", "lora_alpha", "lora_targets"),
               "use_adapter": ("adapter_reduction_dim", "non_linearity"),
               "use_side": ("side_reduction_factor", "add_bias_sampling", "non_linearity"),
               "use_side_only": ("side_reduction_factor", "add_bias_sampling", "non_linearity")}
# every key a method reads: its shaping keys and how it trains
METHOD_OPTIONS = {**METHOD_KEYS, "use_lora": (*METHOD_KEYS["use_lora"], "lora_dropout", "fan_in_fan_out", "merge_weights")}
TUNING_FILE = "tuning.json"
METHODS = ("use_lora", "use_adapter", "use_side", "use_side_only")  # at most one true; none: full_model


@dataclass(frozen=True)
class TuningConfig:
    """What a run trains: the whole model, or LoRA / adapters / a side network on a frozen one."""
    full_model: bool = key(True, "train every parameter (set false by whichever method below is true)")
    use_lora: bool = key(False, "LoRA on the lora_targets projections (galaxy.loralib)")
    lora_dim: int = key(8, "LoRA rank r (alias: lora_att_dim, lora_r)")
    lora_alpha: float = key(32.0, "LoRA scale numerator: the update is scaled by lora_alpha / lora_dim")
    lora_dropout: float = key(0.0, "dropout on LoRA's input")
    fan_in_fan_out: bool = key(False, "GPT-2 Conv1D weights stored [in, out]; Galaxy's are [out, in]: keep false")
    merge_weights: bool = key(False, "fold LoRA's update into the frozen weight in eval mode")
    lora_targets: list = key(["query", "value"], f"projections that get LoRA, of {list(LORA_TARGETS)}")
    use_adapter: bool = key(False, "bottleneck adapters after attention and MLP (Houlsby)")
    adapter_reduction_dim: int = key(16, "width of an adapter's bottleneck")
    non_linearity: str = key("relu", f"activation of adapters and the side network, one of {sorted(ACTIVATIONS)}")
    use_side: bool = key(False, "a side network reads every layer's output; the backbone is frozen")
    use_side_only: bool = key(False, "as use_side, and the backbone's own output is not used")
    side_reduction_factor: int = key(8, "the side network is hidden_size / side_reduction_factor wide")
    add_bias_sampling: bool = key(True, "biases in the side network's down-sampling linears")

    def __post_init__(self):
        methods = [name for name in METHODS if getattr(self, name)]
        if len(methods) > 1:
            raise ConfigError(f"tuning methods {methods} are all true; set exactly one of {['full_model', *METHODS]}")
        settle(self, full_model=not methods)  # a PEFT method switches full-model tuning off
        probability(self, ("lora_dropout",))
        if self.use_lora:  # at most one method is true
            if self.lora_dim < 1:
                raise ConfigError(f"lora_dim must be >= 1 with use_lora, got {self.lora_dim}")
            if not self.lora_targets or any(t not in LORA_TARGETS for t in self.lora_targets):
                raise ConfigError(f"lora_targets {self.lora_targets}: each must be one of {list(LORA_TARGETS)}")
            if self.fan_in_fan_out:
                raise ConfigError("fan_in_fan_out is for GPT-2 Conv1D weights stored [in, out]; "
                                  "BERT's linears are [out, in]: set it false")
        if self.use_adapter and self.adapter_reduction_dim < 1:
            raise ConfigError(f"adapter_reduction_dim must be >= 1, got {self.adapter_reduction_dim}")
        if (self.use_adapter or self.use_side or self.use_side_only) and self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity '{self.non_linearity}' is not one of {sorted(ACTIVATIONS)}")


def tuning_method(cfg):
    return next((name for name in METHODS if cfg[name]), "full_model")


def check_tuning(cfg):
    """The tuning rules that read other sections: the side network's width divides hidden_size, and
    load_trainable was saved with this run's tuning. ConfigError naming the key."""
    if tuning_method(cfg) in ("use_side", "use_side_only"):
        factor = cfg["side_reduction_factor"]
        if factor < 1 or cfg["hidden_size"] % factor:
            raise ConfigError(f"side_reduction_factor {factor} must be >= 1 and divide hidden_size {cfg['hidden_size']}")
    if cfg.get("load_trainable"):
        check_saved_tuning(cfg)


def other_methods_keys(cfg):
    """The tuning keys that only methods other than the config's read."""
    mine = METHOD_OPTIONS[tuning_method(cfg)]
    return sorted({key for keys in METHOD_OPTIONS.values() for key in keys} - set(mine))


def tuning_record(cfg):
    """What a trainable-only checkpoint needs to be rebuilt: the method and its shaping keys."""
    method = tuning_method(cfg)
    return {"method": method, **{k: cfg[k] for k in METHOD_KEYS[method]}}


def save_tuning_record(cfg, directory):
    (Path(directory) / TUNING_FILE).write_text(json.dumps(tuning_record(cfg), indent=1))


def read_tuning_record(directory):
    """The tuning.json beside a trainable-only checkpoint, or None (e.g. a bare safetensors file)."""
    path = Path(directory) / TUNING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or record.get("method") not in METHOD_KEYS:
        raise ConfigError(f"{path}: expected {{\"method\": one of {list(METHOD_KEYS)}, ...}}, got {record!r}")
    return record


def check_saved_tuning(cfg):
    """The run that saved load_trainable must have used this run's tuning (a LoRA file does not fit an
    adapter run; another lora_alpha would load but compute something else). Without a tuning.json
    the tensor names and shapes are still checked when loading."""
    saved, mine = read_tuning_record(cfg["load_trainable"]), tuning_record(cfg)
    if saved is None:
        return
    keys = ["method"] if saved.get("method") != mine["method"] else list(mine)
    diffs = [f"{k} {saved.get(k)!r} there, {mine[k]!r} here" for k in keys if saved.get(k) != mine[k]]
    if diffs:
        raise ConfigError(f"load_trainable {cfg['load_trainable']} was saved with other tuning "
                          f"({TUNING_FILE}): {'; '.join(diffs)}")
