"""LoRA (Hu et al. 2021): W = W0 + s B A, B (out, r) zero-initialised, A (r, in) Kaiming-uniform."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters.base import AdapterLayer, kaiming_uniform_
from ds_bilevel.adapters.fused import adapted_linear, fusable
from ds_bilevel.levels import Level

if TYPE_CHECKING:  # annotations only (adapters/config.py sits above the layer files)
    from ds_bilevel.adapters.config import AdapterConfig


class LoraLayer(AdapterLayer):
    """One-level baseline: A and B are both inner parameters; there is no outer level."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, rank, alpha, dropout)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        kaiming_uniform_(self.lora_A)

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: AdapterConfig) -> LoraLayer:
        return cls(base_layer, config.rank, config.alpha, config.dropout)

    def _level_names(self, level: Level) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if level is Level.INNER else ()

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x for (already dropped-out) activations (..., in) -> (..., out), never forming B A."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def scaled_B(self) -> torch.Tensor:
        """s B (out, r), the factor the fused forward multiplies by (no op when s = 1)."""
        return self.lora_B if self.scaling == 1 else self.lora_B * self.scaling

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # W0 x + bias + s B A dropout(x) in one autograd node (adapters/fused.py): s folded into B,
        # the low-rank term accumulated into the base output; the same values as the plain form
        # below up to float rounding.
        if fusable(self.base_layer):
            return adapted_linear(x, self.dropout(x), self.base_layer, self.fan_in_fan_out, self.lora_A,
                                  self.scaled_B())
        return self.base_layer(x) + self.low_rank(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def merged_weight(self) -> torch.Tensor:
        return self.base_weight() + self.delta_weight().to(self.base_layer.weight.dtype)


def peft_form(layer: LoraLayer) -> dict[str, torch.Tensor]:
    """The layer's tensors under PEFT LoRA's names (export/peft_format.py): A and B as they are."""
    return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}
