"""DoRA (Liu et al. 2024): W' = m * (W0 + s B A) / ||W0 + s B A||_row.

The norm is per output row (over the input dimension): PyTorch's (out, in) layout
makes that ``dim=1``. m starts at ||W0||_row, so the layer is a no-op at init.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters.fused import adapted_linear, fusable
from ds_bilevel.adapters.lora import LoraLayer
from ds_bilevel.adapters.lora import peft_form as lora_peft_form
from ds_bilevel.levels import Level
from ds_bilevel.zero_access import gathered

if TYPE_CHECKING:  # annotations only (adapters/config.py sits above the layer files)
    from ds_bilevel.adapters.config import AdapterConfig


class DoraLayer(LoraLayer):
    """One-level DoRA baseline: A, B and the magnitude m are all inner parameters."""

    # DoRA section 4.3 and PEFT detach the norm: DoRA is one-level, nothing differentiates its
    # gradient again, and the detach saves the backward through ||W0 + s B A||.
    detach_norm_default = True

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 detach_norm: bool | None = None):
        super().__init__(base_layer, rank, alpha, dropout)
        # DoRA section 4.3: treat ||W0 + s B A|| as a constant in backward (PEFT does too).
        # It drops the norm's gradient, so it changes second-order terms of a bi-level
        # hypergradient: kept as an explicit setting.
        self.detach_norm = self.detach_norm_default if detach_norm is None else detach_norm
        with gathered([base_layer.weight]), torch.no_grad():
            row_norm = self.base_weight().float().norm(p=2, dim=1)  # (out,)
        self.magnitude = nn.Parameter(row_norm.to(self.lora_A.dtype))

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: AdapterConfig) -> DoraLayer:
        return cls(base_layer, config.rank, config.alpha, config.dropout, config.detach_norm)

    def _level_names(self, level: Level) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "magnitude") if level is Level.INNER else ()

    def direction_row_norm(self) -> torch.Tensor:
        """||W0 + s B A||_row, (out,); detached when ``detach_norm``."""
        w0 = self.base_weight()
        if self.lora_A.dtype == w0.dtype:
            # W0 + s B A in one matmul that accumulates into W0 (instead of B A, its product by s
            # and the sum with W0: three passes over an (out, in) matrix); the same to rounding.
            weight = torch.addmm(w0, self.lora_B, self.lora_A, alpha=self.scaling)
        else:
            weight = w0 + self.delta_weight().to(w0.dtype)
        norm = weight.norm(p=2, dim=1)
        return norm.detach() if self.detach_norm else norm

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach_norm:
            with torch.no_grad():  # no graph to build for a norm that backward treats as a constant
                norm = self.direction_row_norm()
        else:
            norm = self.direction_row_norm()
        scale = self.magnitude / norm  # (out,)
        w0, bias = self.base_weight(), self.base_layer.bias
        if isinstance(self.dropout, nn.Identity):
            if fusable(self.base_layer):
                # scale * (W0 x + s B A x) + bias in one autograd node (adapters/fused.py): s folded
                # into B, the low-rank term accumulated into the base output, scale and bias in one
                # pass; backward accumulates x's gradient from both paths in one output.
                return adapted_linear(x, None, self.base_layer, self.fan_in_fan_out, self.lora_A,
                                      self.scaled_B(), scale)
            out = scale * (F.linear(x, w0) + self.low_rank(x))
            return out if bias is None else out + bias
        # With adapter dropout, PEFT's form: the frozen path sees the clean input and
        # only the correction (scale - 1) W0 x and the low-rank term see dropped input.
        x_drop = self.dropout(x)
        return self.base_layer(x) + (scale - 1) * F.linear(x_drop, w0) + scale * self.low_rank(x_drop)

    def merged_weight(self) -> torch.Tensor:
        weight = self.base_weight() + self.delta_weight().to(self.base_layer.weight.dtype)
        scale = self.magnitude / weight.norm(p=2, dim=1)
        return (scale.unsqueeze(1) * weight).to(self.base_layer.weight.dtype)


def peft_form(layer: DoraLayer) -> dict[str, torch.Tensor]:
    """PEFT DoRA's tensors (use_dora): A, B and the magnitude vector."""
    return {**lora_peft_form(layer), "lora_magnitude_vector": layer.magnitude}
