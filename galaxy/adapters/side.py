"""Ladder side network (Sung et al., 2022, "LST: Ladder Side-Tuning").

A narrow network runs beside the frozen backbone and reads its hidden states
through per-layer downsamplers. Backbone states are detached, so no gradient
(and no activation memory for backward) goes through the backbone: that is
where LST saves memory compared with adapters or LoRA.
"""
import torch
import torch.nn as nn

from .utils import make_activation


class SideBlock(nn.Module):
    """Pre-norm residual MLP at the side width.

    Token-wise on purpose: it never mixes positions, so it suits causal and
    bidirectional backbones alike and needs no attention mask.
    """

    def __init__(self, width: int, non_linearity: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc_in = nn.Linear(width, 4 * width)
        self.act = make_activation(non_linearity)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc_out(self.act(self.fc_in(self.norm(x))))


class SideNetwork(nn.Module):
    """forward(hidden_states) -> [B, T, hidden_size].

    hidden_states: num_layers + 1 tensors [B, T, hidden_size], the embedding
    output then each layer's output (HF's output_hidden_states layout). The
    downsampled embedding starts the side path; before side block i the
    side state x is mixed with backbone layer i's downsampled output h_i:
    x = g_i * h_i + (1 - g_i) * x, g_i = sigmoid(learned scalar).
    """

    def __init__(self, hidden_size: int, num_layers: int, side_reduction_factor: int = 8,
                 add_bias_sampling: bool = True, non_linearity: str = "gelu"):
        super().__init__()
        if hidden_size % side_reduction_factor:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                             f"side_reduction_factor={side_reduction_factor}")
        width = hidden_size // side_reduction_factor
        self.side_downsamplers = nn.ModuleList(
            nn.Linear(hidden_size, width, bias=add_bias_sampling) for _ in range(num_layers + 1))
        # Gate logits start at 0: sigmoid(0) = 0.5 weighs backbone and side path equally.
        self.side_gates = nn.Parameter(torch.zeros(num_layers))
        self.side_blocks = nn.ModuleList(SideBlock(width, non_linearity) for _ in range(num_layers))
        self.side_norm = nn.LayerNorm(width)
        self.side_upsample = nn.Linear(width, hidden_size, bias=add_bias_sampling)

    def forward(self, hidden_states) -> torch.Tensor:
        if len(hidden_states) != len(self.side_downsamplers):
            raise ValueError(f"expected {len(self.side_downsamplers)} hidden states "
                             f"(embeddings + one per layer), got {len(hidden_states)}")
        down = [sample(h.detach()) for sample, h in zip(self.side_downsamplers, hidden_states)]
        x = down[0]
        for gate, block, h in zip(torch.sigmoid(self.side_gates), self.side_blocks, down[1:]):
            x = block(gate * h + (1 - gate) * x)
        return self.side_upsample(self.side_norm(x))
