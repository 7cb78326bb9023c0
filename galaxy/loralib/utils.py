"""Freezing and checkpoint helpers for models that contain LoRA layers.

`bias` picks which biases train (and are saved) next to lora_A / lora_B:
"none", "all" (every parameter named *bias*) or "lora_only" (biases of
layers that carry a LoRA update), as in microsoft/LoRA's loralib.
"""
import torch.nn as nn

from .layers import Linear

BIAS_MODES = ("none", "all", "lora_only")


def _bias_names(model: nn.Module, bias: str) -> set:
    """Names of the bias parameters that `bias` selects; also validates `bias`."""
    if bias == "none":
        return set()
    if bias == "all":
        return {n for n, _ in model.named_parameters() if "bias" in n}
    if bias == "lora_only":
        return {f"{name}.bias" if name else "bias" for name, m in model.named_modules()
                if isinstance(m, Linear) and m.r > 0 and getattr(m, "bias", None) is not None}
    raise ValueError(f"unknown bias mode {bias!r}; expected one of {BIAS_MODES}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """requires_grad = True for lora_* parameters and the selected biases, False for the rest."""
    trainable_biases = _bias_names(model, bias)  # raises before anything is changed
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name in trainable_biases


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """The part of model.state_dict() that LoRA fine-tuning changes."""
    keep = _bias_names(model, bias) | {n for n, _ in model.named_parameters() if "lora_" in n}
    return {k: v for k, v in model.state_dict().items() if k in keep}
