"""Ladder side network (Sung et al., 2022, "LST: Ladder Side-Tuning").

A narrow network runs beside the frozen backbone and reads its hidden states
through per-layer downsamplers. Backbone states are detached, so no gradient
(and no activation memory for backward) goes through the backbone: that is
where LST saves memory compared with adapters or LoRA.

The network is built for a run of consecutive backbone layers: all of them
serially, one pipeline stage's under pipeline parallelism. Its modules are
keyed by global layer number, so a stage's part has exactly the names (and
hence the initial values and checkpoint entries) of the full network's.
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
    """forward(hidden_states, side=None) -> [B, T, hidden_size] (last part) or the side state.

    layers: the backbone layers this part reads, an int (layers 0..n-1) or a range of global
    layer numbers. The first part downsamples the embedding output (side_downsamplers.0) to
    start the side path; before side block i the side state x is mixed with backbone layer i's
    downsampled output h_i (side_downsamplers.{i+1}): x = g_i * h_i + (1 - g_i) * x,
    g_i = sigmoid(side_gates.{i}). The last part maps x back with side_norm and side_upsample;
    any other part returns x [B, T, hidden_size // side_reduction_factor] for the next part.
    """

    def __init__(self, hidden_size: int, layers, side_reduction_factor: int = 8, add_bias_sampling: bool = True,
                 non_linearity: str = "gelu", first: bool = True, last: bool = True):
        super().__init__()
        if hidden_size % side_reduction_factor:  # configs are refused earlier (check_tuning); a direct build here
            raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                             f"side_reduction_factor={side_reduction_factor}")
        self.layers = range(layers) if isinstance(layers, int) else layers
        self.first, self.last = first, last
        self.width = width = hidden_size // side_reduction_factor
        samplers = [0] * first + [i + 1 for i in self.layers]
        self.side_downsamplers = nn.ModuleDict({str(i): nn.Linear(hidden_size, width, bias=add_bias_sampling)
                                                for i in samplers})
        # Gate logits start at 0: sigmoid(0) = 0.5 weighs backbone and side path equally.
        self.side_gates = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(1)) for i in self.layers})
        self.side_blocks = nn.ModuleDict({str(i): SideBlock(width, non_linearity) for i in self.layers})
        if last:
            self.side_norm = nn.LayerNorm(width)
            self.side_upsample = nn.Linear(width, hidden_size, bias=add_bias_sampling)

    def forward(self, hidden_states, side=None) -> torch.Tensor:
        """hidden_states: the embedding output (first part only), then each of `layers`' outputs
        (HF's output_hidden_states layout); side: the previous part's side state (later parts)."""
        expected = len(self.layers) + self.first
        if len(hidden_states) != expected:
            raise ValueError(f"expected {expected} hidden states ({'embeddings + ' * self.first}"
                             f"one per layer), got {len(hidden_states)}")
        if (side is None) != self.first:
            raise ValueError("the first part starts the side path; every later part needs the side state")
        states = iter(hidden_states)
        x = self.side_downsamplers["0"](next(states).detach()) if self.first else side
        for i, h in zip(self.layers, states, strict=True):
            gate = torch.sigmoid(self.side_gates[str(i)])
            x = self.side_blocks[str(i)](gate * self.side_downsamplers[str(i + 1)](h.detach()) + (1 - gate) * x)
        return self.side_upsample(self.side_norm(x)) if self.last else x
