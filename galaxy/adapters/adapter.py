"""Bottleneck adapter (Houlsby et al., 2019)."""
import torch
import torch.nn as nn

from .utils import make_activation


class Adapter(nn.Module):
    """h + up(act(down(h))) with down: hidden_size -> adapter_reduction_dim.

    up starts at zero, so a fresh adapter is the identity and inserting it
    leaves the pretrained model's outputs unchanged.
    """

    def __init__(self, hidden_size: int, adapter_reduction_dim: int, non_linearity: str = "relu"):
        super().__init__()
        self.adapter_down = nn.Linear(hidden_size, adapter_reduction_dim)
        self.adapter_act = make_activation(non_linearity)
        self.adapter_up = nn.Linear(adapter_reduction_dim, hidden_size)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))
