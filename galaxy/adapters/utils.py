"""Activation lookup and freezing helpers for adapter and side-tuning.

The freezing helpers match on parameter names: Adapter and SideNetwork name
their submodules adapter_* / side_*, so they are found wherever a model
attaches them.
"""
import torch.nn as nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown non-linearity {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _mark_only_named_as_trainable(model: nn.Module, key: str) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = key in name


def mark_only_adapters_as_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for parameters whose name contains "adapter"."""
    _mark_only_named_as_trainable(model, "adapter")


def mark_only_side_as_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for parameters whose name contains "side"."""
    _mark_only_named_as_trainable(model, "side")
