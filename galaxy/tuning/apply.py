"""Parameter-efficient tuning in any layout: LoRA, bottleneck adapters, ladder side-tuning.

`apply_tuning(model, cfg, ctx)` runs once the model is built and its weights are loaded. It
adds the method's modules to the blocks this rank holds (it walks the rank's TransformerLayers,
so a pipeline stage holding only some layers works too), gives the new parameters layout-invariant
initial values (galaxy.models.common.init_new_parameters) and ParamSpecs, and freezes the rest.

How each method meets the layouts:
  LoRA     galaxy.loralib.LoraShard on each targeted projection: it holds its part of the full
           LoRA pair, and says how each factor's gradient is summed.
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
"""
import torch

from galaxy.adapters import Adapter, SideNetwork, mark_only_adapters_as_trainable, mark_only_side_as_trainable
from galaxy.layers.param_spec import GradSum, set_spec
from galaxy.layers.placement import redistribute
from galaxy.layers.transformer import TransformerLayer
from galaxy.loralib import LoraShard, mark_only_lora_as_trainable
from galaxy.models.checkpoint import tensor_files
from galaxy.models.common import init_new_parameters
from galaxy.plan import Method
from galaxy.tuning.keys import LORA_TARGETS, check_tuning, tuning_method


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
        init_new_parameters(model, existing, zero_init, cfg["seed"])
    params = list(dict.fromkeys(model.parameters()))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"tuning {method}: {trainable:,} of {sum(p.numel() for p in params):,} parameters on this rank train"


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TransformerLayer)]


def _add_lora(model, cfg, ctx):
    for name, layer in _layers(model):
        for target in cfg["lora_targets"]:
            block_name, proj = LORA_TARGETS[target]
            block = getattr(layer, block_name)
            site = f"{name}.{block_name}.{proj}"  # a dropout site no other module uses
            setattr(block, proj, LoraShard(getattr(block, proj), cfg, block.method, ctx, site))


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
    model.side = SideNetwork(cfg["hidden_size"], ctx.layers, cfg["side_reduction_factor"], cfg["add_bias_sampling"],
                             cfg["non_linearity"], first=ctx.is_first_stage, last=ctx.is_last_stage)
    SideTap(model, model.side, [layer for _, layer in _layers(model)], ctx, keep_backbone=cfg["use_side"])
    # the backbone is frozen and read detached: only the side state carries a gradient back
    model.pipeline_streams = ((cfg["hidden_size"], False), (model.side.width, True))


def check_sources(cfg):
    """The checkpoints load_sources will read must name readable safetensors files: checked before a
    run creates its save_dir or any process, so a typo there leaves nothing behind (CheckpointError)."""
    for key in ("load_checkpoint", "load_trainable"):
        if cfg[key] and not cfg["resume"]:
            tensor_files(cfg[key])


def load_sources(model, cfg, ctx, verified=False):
    """Fill a built model from the run's sources, in order: load_checkpoint's weights (over the
    seed's, drawn as it was built), the tuning method (which adds and initialises its parameters
    and freezes the rest), load_trainable's weights. `verified`: these files passed the whole
    model's checks at start-up, so only this model's own slices are read (galaxy.reshard.relayout's
    rebuilt part of a lost rank). Returns (what load_checkpoint skipped, the tuning line)."""
    skipped = []
    if cfg["load_checkpoint"] and not cfg["resume"]:
        skipped = model.load_hf(cfg["load_checkpoint"], strict=cfg["strict"], verified=verified)
    tuning = apply_tuning(model, cfg, ctx)  # LoRA / adapter / side: freezes the rest
    if cfg["load_trainable"] and not cfg["resume"]:  # their parameters exist only now
        model.load_hf(cfg["load_trainable"], trainable_only=True, verified=verified)
    return skipped, tuning
