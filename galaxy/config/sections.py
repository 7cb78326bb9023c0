"""The config sections of the packages above galaxy.config: train/ (optimizer, loop, ZeRO,
checkpoints) and runtime/ (processes). Those packages read a Config (cfg.optim.learning_rate) without
importing it (tests/test_layering.py), so their sections are defined, and their keys' rules
checked, here; the sections of the packages below config live with them (LayoutConfig in
galaxy/plan.py, DataConfig in galaxy/data/build.py, TuningConfig in galaxy/tuning/keys.py, the
model's config class in galaxy/models/<arch>/config.py)."""
from dataclasses import dataclass

from galaxy.errors import ConfigError
from galaxy.keys import at_least, key, one_of, positive, probability
from galaxy.seeding import DEFAULT_SEED


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its LR schedule (galaxy/train/optim.py)."""
    learning_rate: float = key(5e-4, "peak learning rate, after warmup (alias: lr)")
    weight_decay: float = key(0.01, "AdamW weight decay of matrices (biases and norms: none)")
    adam_beta1: float = key(0.9, "AdamW's first-moment decay")
    adam_beta2: float = key(0.999, "AdamW's second-moment decay")
    adam_eps: float = key(1e-8, "AdamW's denominator epsilon")
    warmup_steps: int = key(10, "optimizer steps of linear warmup from 0")
    lr_scheduler: str = key("linear", "decay after warmup: linear | cosine | constant")
    max_grad_norm: float = key(1.0, "clip the global gradient norm to this; 0 disables clipping")

    def __post_init__(self):
        at_least(self, ("warmup_steps", "learning_rate", "weight_decay", "max_grad_norm"), 0)
        positive(self, ("adam_eps",))
        probability(self, ("adam_beta1", "adam_beta2"))
        one_of(self, "lr_scheduler", ("linear", "cosine", "constant"))


@dataclass(frozen=True)
class LoopConfig:
    """The training loop (galaxy/train/loop.py): steps, precision, seed, logging."""
    train: bool = key(True, "train (true) or only run the forward pass (false)")
    gradient_accumulation_steps: int = key(1, "micro-steps of batch_size samples per optimizer step "
                                              "(alias: grad_accum_steps)")
    num_epochs: int = key(1, "passes over the data, when max_steps is not given")
    max_steps: int = key(None, "optimizer steps; default = one pass of num_epochs")
    seed: int = key(DEFAULT_SEED, "initial weights, data order and masking, dropout masks derive from it")
    dtype: str = key("fp32", "fp32 | bf16 (autocast; fp32 master weights) | bf16_pure (bf16 parameters and "
                             "optimizer state)")
    activation_checkpointing: bool = key(False, "recompute each layer in backward instead of keeping its activations")
    bucket_size_mb: float = key(25.0, "gradient all-reduce bucket size")
    log_every: int = key(1, "print a step's loss every N optimizer steps")
    on_nonfinite: str = key("stop", "a step with a non-finite loss or gradient norm: stop the run, or skip "
                                    "its optimizer step and go on")
    memory_report: bool = key(False, "each rank prints its model state at start-up and the peak of its second "
                                     "step beside galaxy.profiler.memory's prediction (a meta build of the rank: "
                                     "seconds)")

    def __post_init__(self):
        at_least(self, ("gradient_accumulation_steps", "max_steps", "log_every"), 1)
        at_least(self, ("num_epochs",), 0)
        positive(self, ("bucket_size_mb",))
        one_of(self, "dtype", ("fp32", "bf16", "bf16_pure"))
        one_of(self, "on_nonfinite", ("stop", "skip"))
        if self.memory_report and self.max_steps == 1:
            raise ConfigError("config key 'memory_report' measures the second step (the first creates AdamW's "
                              "state), but max_steps is 1")


@dataclass(frozen=True)
class ZeroConfig:
    """ZeRO (galaxy/train/zero.py): what needs no plan; check_zero checks the rest against the replicas."""
    zero_stage: int = key(0, "ZeRO over the data-parallel group: 1 shards AdamW state, 2 also gradients, "
                             "3 also parameters; 0 = off")
    zero_shard_list: list = key(None, "fraction of every sharded tensor each data-parallel rank holds, "
                                      "e.g. [0.5, 0.3, 0.2]; default even")
    memory_mb: list[int] = key(None, "each data-parallel rank's memory in MiB: ZeRO shards in proportion "
                                     "(instead of zero_shard_list)")

    def __post_init__(self):
        one_of(self, "zero_stage", (0, 1, 2, 3))
        fractions = self.zero_shard_list
        if self.memory_mb is not None:
            if fractions is not None:
                raise ConfigError("config keys 'zero_shard_list' and 'memory_mb' both set how ZeRO shards; set one")
            if any(m < 1 for m in self.memory_mb):
                raise ConfigError(f"config key 'memory_mb' must hold positive sizes in MiB, got {self.memory_mb}")
        if fractions is None:
            return
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in fractions):
            raise ConfigError(f"config key 'zero_shard_list' must hold positive fractions, got {fractions!r}")
        if abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(f"config key 'zero_shard_list' {fractions} sums to {sum(fractions):g}, not 1")


@dataclass(frozen=True)
class CheckpointConfig:
    """The weights a run starts from and what it saves where (galaxy/train/checkpoint.py, the entries)."""
    load_checkpoint: str = key(None, "a Hugging Face directory or safetensors file to start from")
    strict: bool = key(True, "load_checkpoint must hold exactly the model's tensors; false loads those that "
                             "match and lists the tensors missing and unused")
    save_dir: str = key(None, "training checkpoints go to save_dir/step-N/; the final HF export to save_dir")
    save_every: int = key(0, "save a training checkpoint every N optimizer steps (and at the last); 0 = never")
    keep_checkpoints: int = key(0, "keep only the newest K training checkpoints; 0 = keep all")
    resume: bool = key(False, "continue from the newest complete checkpoint in save_dir")
    save_on_signal: bool = key(False, "on SIGTERM/SIGINT every rank stops at the same step and saves a "
                                      "training checkpoint to save_dir before it exits")
    save_trainable_only: bool = key(False, "the final export holds only the trained tensors (LoRA / adapter / "
                                           "side), with tuning.json beside them")
    load_trainable: str = key(None, "a save_trainable_only directory, loaded after load_checkpoint once the "
                                    "tuning method has added its parameters (its tuning.json must match this run's)")

    def __post_init__(self):
        at_least(self, ("save_every", "keep_checkpoints"), 0)
        for name in ("resume", "save_every", "save_on_signal"):
            if getattr(self, name) and not self.save_dir:
                raise ConfigError(f"config key '{name}' is {getattr(self, name)!r} but save_dir is not set; "
                                  f"training checkpoints live in save_dir")


@dataclass(frozen=True)
class RuntimeConfig:
    """Processes (galaxy/runtime/): where ranks meet, how they talk, how long they wait, elastic restarts."""
    init_method: str = key(None, "where ranks meet, e.g. tcp://127.0.0.1:23000 (after --master_addr/--master_port "
                                 "and MASTER_ADDR/MASTER_PORT)")
    distributed_backend: str = key(None, "gloo | nccl (default: nccl on CUDA, else gloo)")
    device: str = key(None, "cpu | cuda | cuda:N (default: cuda:<local rank> under nccl, else cpu)")
    timeout_s: float = key(300.0, "collective / rendezvous timeout")
    elastic: bool = key(False, "a one-command local spawn restarts its surviving ranks when one dies: re-planned "
                               "for the smaller world, training resumes from the latest checkpoint "
                               "(galaxy.runtime.elastic)")
    elastic_restarts: int = key(3, "--elastic: at most this many restarts")

    def __post_init__(self):
        at_least(self, ("elastic_restarts",), 1)
        positive(self, ("timeout_s",))
        one_of(self, "distributed_backend", ("gloo", "nccl", None))
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"config key 'device' is {self.device!r}, expected cpu, cuda or cuda:N")
