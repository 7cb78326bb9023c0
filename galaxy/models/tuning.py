"""Parameter-efficient tuning in any layout: LoRA, bottleneck adapters, ladder side-tuning.

`apply_tuning(model, cfg, ctx)` runs once the model is built and its weights are loaded. It
adds the method's modules to the blocks this rank holds (it walks the rank's TransformerLayers,
so a pipeline stage holding only some layers works too), gives the new parameters
layout-invariant initial values and the ParamSpec (shard, grad_sum) the rest of the engine
reads, and freezes every other parameter. The optimizer and gradient sync then see only what
trains.

How each method meets the layouts:
  LoRA     A column-parallel projection (q, k, v, up: output rows split) keeps lora_A whole and
           holds lora_B's rows; a row-parallel one (o, down: input columns split) holds lora_A's
           columns and keeps lora_B whole (galaxy.loralib.lora_shard_slices). The whole factor's
           gradient is then one rank's share of a sum: GradSum.STAGE. In an SP block both factors
           are too, like the block's own weights (each rank saw only its positions).
  adapter  Runs inside the connective block (Houlsby: after dropout, before the residual add) on h
           after its redistribution, REPLICATE or SEQ, never on a TP block's PARTIAL output.
           GradSum.STAGE when the connective block is SP.
  side     Reads the first layer's input and every layer's output, gathered to REPLICATE, and
           feeds the MLM head: use_side gives the head backbone output + side output (side_upsample
           starts at zero, so training starts from the backbone's own predictions), use_side_only
           the side output alone. Every tensor rank runs the same side network on the same inputs,
           so its gradients need no tensor-group sum. The MLM head stays frozen. A pipeline stage
           holds the side network's part for its own layers (galaxy.adapters.SideNetwork) and
           passes the side state on beside the hidden states (`model.pipeline_streams`).

Initial values are drawn for the full tensor from the stream (run seed, "tuning init", parameter
name), then sliced by its shard (as init_weights does), so every layout starts from the serial values.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from galaxy.adapters import Adapter, SideNetwork, mark_only_adapters_as_trainable, mark_only_side_as_trainable
from galaxy.adapters.utils import ACTIVATIONS
from galaxy.layers.dropout import LayoutInvariantDropout
from galaxy.layers.param_spec import GradSum, Shard, set_spec, spec_of
from galaxy.layers.placement import redistribute
from galaxy.layers.transformer import TransformerLayer
from galaxy.loralib import Linear as LoraLinear
from galaxy.loralib import mark_only_lora_as_trainable
from galaxy.models.checkpoint import full_shape, own_slice
from galaxy.plan import Method
from galaxy.seeding import generator
from galaxy.errors import ConfigError

# config name (Hugging Face BERT's module name) -> (block, projection) in our layers
LORA_TARGETS = {"query": ("attn", "q"), "key": ("attn", "k"), "value": ("attn", "v"),
                "dense": ("attn", "o"), "intermediate": ("mlp", "up"), "output": ("mlp", "down")}
BLOCK_METHOD = {"attn": "att", "mlp": "mlp"}  # which Plan field says how a block is split
# the keys that decide which tensors a method adds and what they compute (not how they train)
METHOD_KEYS = {"full_model": (), "use_lora": ("lora_dim", "lora_alpha", "lora_targets"),
               "use_adapter": ("adapter_reduction_dim", "non_linearity"),
               "use_side": ("side_reduction_factor", "add_bias_sampling", "non_linearity"),
               "use_side_only": ("side_reduction_factor", "add_bias_sampling", "non_linearity")}
TUNING_FILE = "tuning.json"  # beside a trainable-only checkpoint, like PEFT's adapter_config.json


def tuning_method(cfg):
    return next((k for k in ("use_lora", "use_adapter", "use_side", "use_side_only") if cfg[k]), "full_model")


def check_tuning(cfg):
    """The tuning keys' rules; ConfigError naming the key (called by load_config)."""
    method = tuning_method(cfg)
    if method == "use_lora":
        if cfg["lora_dim"] < 1:
            raise ConfigError(f"lora_dim must be >= 1 with use_lora, got {cfg['lora_dim']}")
        unknown = [t for t in cfg["lora_targets"] if t not in LORA_TARGETS]
        if unknown or not cfg["lora_targets"]:
            raise ConfigError(f"lora_targets {cfg['lora_targets']}: each must be one of {list(LORA_TARGETS)}")
        if cfg["fan_in_fan_out"]:
            raise ConfigError("fan_in_fan_out is for GPT-2 Conv1D weights stored [in, out]; "
                              "BERT's linears are [out, in]: set it false")
    if method == "use_adapter" and cfg["adapter_reduction_dim"] < 1:
        raise ConfigError(f"adapter_reduction_dim must be >= 1, got {cfg['adapter_reduction_dim']}")
    if method in ("use_adapter", "use_side", "use_side_only") and cfg["non_linearity"] not in ACTIVATIONS:
        raise ConfigError(f"non_linearity '{cfg['non_linearity']}' is not one of {sorted(ACTIVATIONS)}")
    if method in ("use_side", "use_side_only"):
        factor = cfg["side_reduction_factor"]
        if factor < 1 or cfg["hidden_size"] % factor:
            raise ConfigError(f"side_reduction_factor {factor} must be >= 1 and divide hidden_size {cfg['hidden_size']}")
    if cfg.get("load_trainable"):
        check_saved_tuning(cfg)


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


def apply_tuning(model, cfg, ctx):
    """Add the config's tuning method to `model` in place and freeze what it does not train.
    Returns a one-line summary for the log."""
    check_tuning(cfg)
    method = tuning_method(cfg)
    existing = {id(p) for p in model.parameters()}
    zero_init = ()
    with torch.device(ctx.device):  # the new parameters join the model on its device
        if method == "use_lora":
            _add_lora(model, cfg, ctx)
            mark_only_lora_as_trainable(model)
            zero_init = ("lora_B",)  # B = 0: a fresh LoRA layer computes what the frozen one did
        elif method == "use_adapter":
            _add_adapters(model, cfg)
            mark_only_adapters_as_trainable(model)
            zero_init = ("adapter_up",)  # a fresh adapter is the identity
        elif method in ("use_side", "use_side_only"):
            _add_side(model, cfg, ctx)
            mark_only_side_as_trainable(model)
            zero_init = ("side_upsample",) if method == "use_side" else ()
        _init_new_parameters(model, existing, zero_init, cfg["seed"])
    params = list(dict.fromkeys(model.parameters()))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"tuning {method}: {trainable:,} of {sum(p.numel() for p in params):,} parameters on this rank train"


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TransformerLayer)]


class LoraShard(LoraLinear):
    """LoRA on this rank's shard of a ColumnLinear / RowLinear.

    It takes over the base's weight and bias Parameters (loaded values and ParamSpecs, so
    checkpoints still find them) and adds its part of the full LoRA pair. The LoRA input's
    dropout mask is its part of the full input's mask, so it matches the serial run's.
    """

    def __init__(self, base, cfg, method, ctx, site):
        out_features, in_features = base.weight.shape
        super().__init__(in_features, out_features, r=cfg["lora_dim"], lora_alpha=cfg["lora_alpha"],
                         merge_weights=cfg["merge_weights"], bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.owns_bias = getattr(base, "owns_bias", True)  # a row-parallel bias is added on one rank
        self.lora_dropout = LayoutInvariantDropout(cfg["lora_dropout"], site)
        self.ctx, self.seq_sharded = ctx, method is Method.SP
        shard = spec_of(base.weight).shard
        held, whole = (self.lora_B, self.lora_A) if shard.dim == 0 else (self.lora_A, self.lora_B)
        set_spec(held, shard=shard)
        self.in_cols = shard if shard.dim == 1 else None
        if shard.length < shard.full:
            set_spec(whole, grad_sum=GradSum.STAGE)
        if self.seq_sharded:
            set_spec(*self.parameters(), grad_sum=GradSum.STAGE)

    def _dropout_view(self, x):
        """The full [B, T, in] LoRA input's shape and this rank's index into it."""
        full, seq, cols = list(x.shape), slice(None), slice(None)
        if self.seq_sharded:
            pos = self.ctx.positions
            full[1], seq = sum(self.ctx.plan.positions), slice(pos.start, pos.stop)
        if self.in_cols is not None:
            cols, full[-1] = slice(self.in_cols.start, self.in_cols.start + self.in_cols.length), self.in_cols.full
        return tuple(full), (slice(None), seq, cols)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias if self.owns_bias else None)
        if self.merged:
            return out
        dropped = self.lora_dropout(x, *self._dropout_view(x))
        return out + (dropped @ self.lora_A.T @ self.lora_B.T) * self.scaling


def _add_lora(model, cfg, ctx):
    for name, layer in _layers(model):
        for target in cfg["lora_targets"]:
            block_name, proj = LORA_TARGETS[target]
            block = getattr(layer, block_name)
            method = getattr(ctx.plan, BLOCK_METHOD[block_name])
            site = f"{name}.{block_name}.{proj}"  # a dropout site no other module uses
            setattr(block, proj, LoraShard(getattr(block, proj), cfg, method, ctx, site))


def _add_adapters(model, cfg):
    for _, layer in _layers(model):
        for con in (layer.con1, layer.con2):
            con.adapter = Adapter(cfg["hidden_size"], cfg["adapter_reduction_dim"], cfg["non_linearity"])
            if con.method is Method.SP:
                set_spec(*con.adapter.parameters(), grad_sum=GradSum.STAGE)


class SideTap:
    """Hooks that run this stage's part of the side network beside the backbone.

    They collect the backbone's hidden states (the embedding output on the first stage, each
    layer's output) as REPLICATE tensors and, as the backbone's forward hook, run the side part
    on them. The last stage hands the head the side output in place of (or added to) the
    backbone's; an earlier stage returns (hidden states, side state) for the next stage, which
    receives them as `hidden_states=(h, side)` (split off by the model's pre-hook)."""

    def __init__(self, model, side, layers, ctx, keep_backbone):
        self.side, self.ctx, self.keep_backbone = side, ctx, keep_backbone
        self.states, self.incoming = [], None
        model.register_forward_pre_hook(self._stage_input, with_kwargs=True)
        if side.first:
            layers[0].register_forward_pre_hook(self._first_input)
        for layer in layers:
            layer.register_forward_hook(self._layer_output)
        model.side_backbone.register_forward_hook(self)

    def _replicated(self, x, placement):
        # detached first: no gradient flows into the frozen backbone, so the gather records no graph
        return redistribute(x.detach(), placement, Method.NONE, self.ctx)

    def _stage_input(self, model, args, kwargs):
        if isinstance(kwargs.get("hidden_states"), tuple):  # a later pipeline stage
            kwargs["hidden_states"], self.incoming = kwargs["hidden_states"]
        return args, kwargs

    def _first_input(self, layer, args):
        self.states = [self._replicated(args[0], layer.input_placement)]

    def _layer_output(self, layer, args, out):
        self.states.append(self._replicated(out, layer.output_placement))

    def __call__(self, backbone, args, out):
        side = self.side(self.states, self.incoming)
        self.states, self.incoming = [], None
        if not self.side.last:
            return out, side
        return out.detach() + side if self.keep_backbone else side


def _add_side(model, cfg, ctx):
    layers = [layer for _, layer in _layers(model)]
    model.side = SideNetwork(cfg["hidden_size"], ctx.layers, cfg["side_reduction_factor"], cfg["add_bias_sampling"],
                             cfg["non_linearity"], first=ctx.is_first_stage, last=ctx.is_last_stage)
    SideTap(model, model.side, layers, ctx, keep_backbone=cfg["use_side"])
    # the backbone is frozen and read detached: only the side state carries a gradient back
    model.pipeline_streams = ((cfg["hidden_size"], False), (model.side.width, True))


def _init_new_parameters(model, existing, zero_init, seed):
    for name, p in model.named_parameters():
        if id(p) not in existing:
            with torch.no_grad():
                p.copy_(_initial_value(name, p, zero_init, seed))


def _initial_value(name, p, zero_init, seed):
    """Biases 0, norm weights 1, `zero_init` matrices 0, other matrices nn.Linear's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn full, then sliced by the shard."""
    full = full_shape(p)
    if name.endswith("bias") or (p.dim() < 2 and "norm" not in name) or any(z in name for z in zero_init):
        value = torch.zeros(full)
    elif p.dim() < 2:
        value = torch.ones(full)
    else:
        value = (torch.rand(full, generator=generator(seed, "tuning init", name), device="cpu") * 2 - 1) / math.sqrt(full[-1])
    return own_slice(value, p)
