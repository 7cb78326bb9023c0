"""What every architecture shares: the serial context, building on the context's device, the
per-name weight init (of the model's own weights and of those a tuning method adds), and the
causal attention bias of the decoders (LLaMA's, BART's)."""
import functools
import math

import torch
import torch.nn.functional as F

from galaxy.comm.context import ParallelContext
from galaxy.layers.param_spec import spec_of
from galaxy.models.checkpoint import full_shape, own_slice
from galaxy.plan import Plan
from galaxy.seeding import DEFAULT_SEED, generator


def serial_context(cfg):
    """The one-rank context a model gets when none is given: it builds the whole model."""
    heads = cfg.num_attention_heads
    return ParallelContext(Plan(heads=(heads,), kv_heads=(getattr(cfg, "num_key_value_heads", None) or heads,),
                                columns=(cfg.intermediate_size,), positions=(cfg.max_position_embeddings,),
                                stage_layers=(cfg.num_hidden_layers,)))


def on_context_device(init):
    """Decorates a model's __init__(self, cfg, ctx=None): everything it creates is made on
    ctx.device (the serial context's when none is given), so a model is born where it runs."""
    @functools.wraps(init)
    def build(self, cfg, ctx=None):
        ctx = ctx or serial_context(cfg)
        with torch.device(ctx.device):
            init(self, cfg, ctx)
    return build


def init_weights(model, std, seed=DEFAULT_SEED):
    """Normal(0, std) weights, zero biases, unit norm scales (BERT's and LLaMA's initialisation),
    drawn per *full* tensor from the stream (run seed, "init", parameter name), then sliced: every
    layout starts from exactly the serial model's weights, and each seed from other ones. Drawn on
    the CPU, so every device starts from the same values. A model on the meta device (built for its
    shapes, or to be filled by a re-plan's move) draws nothing."""
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        full = full_shape(p)
        if name.endswith("bias"):
            value = torch.zeros(full)
        elif "norm" in name.lower() and p.dim() == 1:
            value = torch.ones(full)
        else:
            stream = generator(seed, "init", spec_of(p).init_name or name)
            value = torch.randn(full, generator=stream, device="cpu") * std
        with torch.no_grad():
            p.copy_(own_slice(value, p))


def init_new_parameters(model, existing, zero_init, seed):
    """The parameters not in `existing` (ids; a tuning method's): biases 0, norm weights 1,
    `zero_init` matrices 0, other matrices nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn per full tensor from the stream (run seed, "tuning init", name), then sliced."""
    for name, p in ((n, p) for n, p in model.named_parameters() if id(p) not in existing and not p.is_meta):
        full = full_shape(p)
        if name.endswith("bias") or (p.dim() < 2 and "norm" not in name) or any(z in name for z in zero_init):
            value = torch.zeros(full)
        elif p.dim() < 2:
            value = torch.ones(full)
        else:
            stream = generator(seed, "tuning init", name)
            value = (torch.rand(full, generator=stream, device="cpu") * 2 - 1) / math.sqrt(full[-1])
        with torch.no_grad():
            p.copy_(own_slice(value, p))


def causal_bias(length, attention_mask=None, dtype=torch.float32, device=None):
    """Additive [1 or B, 1, length, length] bias over all positions: position i sees j <= i, and
    with attention_mask ([B, length], 1 = token, 0 = padding) no padding."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None and not bool(attention_mask.all()):
        allowed = allowed & attention_mask[:, None, None, :].bool()
    # finfo.min rather than -inf: a fully masked row (a padding query) stays finite
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def lm_loss(logits, labels):
    """(sum of the token losses, number of label tokens), a label of -100 carrying none: callers divide
    by the count of the *global* batch, so every layout matches serial exactly."""
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()
