"""LoRA layers (Hu et al., 2021): a frozen weight W plus a trainable low-rank
update (B @ A) * lora_alpha / r.

On a tensor-parallel shard, galaxy.loralib.shard.LoraShard holds the matching
slice of the full lora_A / lora_B.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALayer:
    """State shared by every LoRA layer, mixed in before the torch layer.

    It comes first among the bases so that its `train()` wraps `nn.Module.train`
    (the torch layers do not override `train`). Subclasses call
    `nn.<Layer>.__init__` first (module attributes need it) and then this one.
    """

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        if r < 0:
            raise ValueError(f"LoRA rank r must be >= 0, got {r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights

    def _add_lora_parameters(self, a_shape, b_shape) -> None:
        self.lora_A = nn.Parameter(self.weight.new_empty(a_shape))
        self.lora_B = nn.Parameter(self.weight.new_empty(b_shape))
        self.weight.requires_grad = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # A as nn.Linear inits its weight, B zero: a fresh layer equals the frozen one.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The scaled low-rank update, in the layout `self.weight` is stored in."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        # Eval merges the update into W so inference costs nothing extra;
        # training unmerges it so A and B get their own gradients again.
        super().train(mode)
        if self.r > 0:
            with torch.no_grad():
                if mode and self.merged:
                    self.weight -= self.delta_weight()
                    self.merged = False
                elif not mode and self.merge_weights and not self.merged:
                    self.weight += self.delta_weight()
                    self.merged = True
        return self


class _LoRALinearBase(LoRALayer, nn.Linear):
    """The frozen linear part shared by `Linear` and `MergedLinear`."""

    def __init__(self, in_features, out_features, r, lora_alpha, lora_dropout,
                 fan_in_fan_out, merge_weights, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            # Store W as [in, out] like GPT-2's Conv1D so its checkpoints load as is.
            self.weight.data = self.weight.data.T.contiguous()

    def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias)


class Linear(_LoRALinearBase):
    """Drop-in for nn.Linear: lora_A [r, in], lora_B [out, r]."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout,
                         fan_in_fan_out, merge_weights, **kwargs)
        if r > 0:
            self._add_lora_parameters((r, in_features), (out_features, r))

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._frozen_forward(x)
        if self.r > 0 and not self.merged:
            out = out + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return out


class Embedding(LoRALayer, nn.Embedding):
    """Drop-in for nn.Embedding: lora_A [r, num_embeddings] zeros, lora_B [embedding_dim, r] normal."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0,
                 lora_alpha: float = 1, merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        # Dropout on token ids means nothing, so the LoRA path has none.
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self._add_lora_parameters((r, num_embeddings), (embedding_dim, r))

    def reset_lora_parameters(self) -> None:
        # Zero goes on A here: A is the per-token lookup table, B the shared projection.
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(self, x)
        if self.r > 0 and not self.merged:
            # padding_idx keeps the padding token's column of A at zero (no gradient).
            after_a = F.embedding(x, self.lora_A.T, self.padding_idx)
            out = out + (after_a @ self.lora_B.T) * self.scaling
        return out


class MergedLinear(_LoRALinearBase):
    """Fused projection (e.g. QKV) whose output splits into len(enable_lora) equal
    chunks; only the chunks flagged True get a LoRA update.

    With n enabled chunks of size c: lora_A is [r * n, in] (one [r, in] block per
    chunk) and lora_B is [c * n, r] (one [c, r] block per chunk).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora=(False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        if out_features % len(enable_lora):
            raise ValueError(f"out_features={out_features} does not split into "
                             f"{len(enable_lora)} equal chunks")
        if r > 0 and not any(enable_lora):
            raise ValueError("enable_lora selects no chunk; use Linear with r=0 instead")
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout,
                         fan_in_fan_out, merge_weights, **kwargs)
        self.enable_lora = list(enable_lora)
        self.chunk_size = out_features // len(enable_lora)
        self.lora_chunks = [i for i, on in enumerate(enable_lora) if on]
        if r > 0:
            n = len(self.lora_chunks)
            self._add_lora_parameters((r * n, in_features), (self.chunk_size * n, r))

    def _to_all_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """[..., n * c] outputs of the enabled chunks -> [..., out], zeros elsewhere."""
        full = t.new_zeros(*t.shape[:-1], len(self.enable_lora), self.chunk_size)
        full[..., self.lora_chunks, :] = t.unflatten(-1, (len(self.lora_chunks), self.chunk_size))
        return full.flatten(-2)

    def _blocks(self):
        """lora_A as [n, r, in] and lora_B as [n, c, r]: one LoRA pair per enabled chunk."""
        n = len(self.lora_chunks)
        return self.lora_A.view(n, self.r, -1), self.lora_B.view(n, self.chunk_size, self.r)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._blocks()
        delta = torch.bmm(b, a).flatten(0, 1)  # [n * c, in]
        delta = self._to_all_chunks(delta.T) * self.scaling  # [in, out]
        return delta if self.fan_in_fan_out else delta.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._frozen_forward(x)
        if self.r > 0 and not self.merged:
            a, b = self._blocks()
            after_a = torch.einsum("...i,nri->...nr", self.lora_dropout(x), a)
            after_b = torch.einsum("...nr,ncr->...nc", after_a, b).flatten(-2)
            out = out + self._to_all_chunks(after_b) * self.scaling
        return out
