"""LoRA (Hu et al., 2021): a frozen weight W plus a trainable low-rank update
(B @ A) * lora_alpha / r, as a drop-in for nn.Linear.

On a tensor-parallel shard, galaxy.loralib.shard.LoraShard holds the matching
slice of the full lora_A / lora_B.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """nn.Linear with lora_A [r, in] (initialised as nn.Linear's weight) and lora_B [out, r]
    (zeros, so a fresh layer computes what the frozen one did). r = 0: a plain, trainable layer.
    eval() merges the update into W when merge_weights; train() subtracts it again.
    fan_in_fan_out stores W as [in, out] (GPT-2's Conv1D), so those checkpoints load as they are."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        if r < 0:
            raise ValueError(f"LoRA rank r must be >= 0, got {r}")
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r if r > 0 else 0.0
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.fan_in_fan_out, self.merge_weights, self.merged = fan_in_fan_out, merge_weights, False
        if fan_in_fan_out:
            self.weight.data = self.weight.data.T.contiguous()
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_empty(r, in_features))
            self.lora_B = nn.Parameter(self.weight.new_zeros(out_features, r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.weight.requires_grad = False

    def delta_weight(self) -> torch.Tensor:
        """The scaled low-rank update, in the layout `self.weight` is stored in."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def train(self, mode: bool = True):
        super().train(mode)
        if self.r > 0:
            with torch.no_grad():
                if mode and self.merged:  # unmerge: A and B get their own gradients again
                    self.weight -= self.delta_weight()
                    self.merged = False
                elif not mode and self.merge_weights and not self.merged:  # merge: no cost at inference
                    self.weight += self.delta_weight()
                    self.merged = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.T if self.fan_in_fan_out else self.weight, self.bias)
        if self.r > 0 and not self.merged:
            out = out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return out
