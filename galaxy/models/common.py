"""What every architecture shares: the serial context and the per-name weight init."""
import torch

from galaxy.comm.context import ParallelContext
from galaxy.models.checkpoint import full_shape, own_slice
from galaxy.plan import Plan
from galaxy.seeding import DEFAULT_SEED, generator


def serial_context(cfg):
    """The one-rank context a model gets when none is given: it builds the whole model."""
    heads = cfg.num_attention_heads
    plan = Plan(heads=(heads,), kv_heads=(getattr(cfg, "num_key_value_heads", None) or heads,),
                columns=(cfg.intermediate_size,), positions=(cfg.max_position_embeddings,),
                stage_layers=(cfg.num_hidden_layers,))
    return ParallelContext(plan)


def init_weights(model, std, seed=DEFAULT_SEED):
    """Normal(0, std) weights, zero biases, unit norm scales (BERT's and LLaMA's initialisation),
    drawn per *full* tensor from the stream (run seed, "init", parameter name), then sliced: every
    layout starts from exactly the serial model's weights, and each seed from other ones."""
    for name, p in model.named_parameters():
        full = full_shape(p)
        if name.endswith("bias"):
            value = torch.zeros(full)
        elif "norm" in name.lower() and p.dim() == 1:
            value = torch.ones(full)
        else:
            value = torch.randn(full, generator=generator(seed, "init", getattr(p, "init_name", name))) * std
        with torch.no_grad():
            p.copy_(own_slice(value, p))
