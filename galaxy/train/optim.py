"""AdamW over the trainable parameters only, with warmup then linear / cosine / constant decay
(the config's optim section, galaxy.config.sections.OptimConfig)."""
import functools
import math

import torch

from galaxy.train.zero import ZeroAdamW


def build_optimizer(model, cfg, total_steps, zero=None):
    """AdamW and its LR schedule; with `zero` (galaxy.train.zero.Zero) the sharding ZeroAdamW."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases and norms, as in BERT
    groups = [g for g in ({"params": decay, "weight_decay": cfg.optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # fused AdamW (one kernel over all tensors) where torch has it, CUDA; the per-tensor loop elsewhere
    kernel = {"fused": True} if params and params[0].is_cuda else {"foreach": False}
    adamw = functools.partial(ZeroAdamW, zero=zero) if zero else torch.optim.AdamW
    opt = adamw(groups, lr=cfg.optim.learning_rate, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                eps=cfg.optim.adam_eps, **kernel)
    return opt, lr_schedule(opt, cfg, total_steps)


def lr_schedule(opt, cfg, total_steps, steps_taken=0):
    """The LR schedule of `cfg` over `total_steps`, positioned after `steps_taken` optimizer steps,
    with the optimizer's learning rates set for the next one. A resumed run builds it anew from its
    own config: extending max_steps or changing warmup or the LR must not leave the first resumed
    step at the saved schedule's last LR (0.0 at the end of a linear decay)."""
    for group in opt.param_groups:
        group["initial_lr"] = cfg.optim.learning_rate  # LambdaLR's base LR; a loaded state holds the old one
    kind, warmup = cfg.optim.lr_scheduler, cfg.optim.warmup_steps

    def factor(step):  # step counts optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return torch.optim.lr_scheduler.LambdaLR(opt, factor, last_epoch=steps_taken - 1)


def optimizer_state_bytes(opt):
    sharded = getattr(opt, "moments", ())  # ZeroAdamW's shards of its flat units
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)) \
        + sum(t.numel() * t.element_size() for pair in sharded for t in pair)
