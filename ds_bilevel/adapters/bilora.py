"""BiLoRA (arXiv 2403.13037): dW = s * P diag(lambda) Q, a pseudo-SVD.

P (out, r) and Q (r, in) are the pseudo singular vectors (inner level, trained on D1 with
the orthogonality regulariser R1); lambda (r,) are the pseudo singular values (outer level,
trained on D2). The paper ablates three parameterisations of lambda (real, softmax,
approximately binary); its initial values and scaling were not found, so the choices here
are documented in docs/methods.md:

- P = 0 (like LoRA's B), so dW = 0 at step 0 whatever lambda is;
- Q Kaiming-uniform (like LoRA's A);
- the raw lambda starts at 1 for ``real`` (lambda = 1, LoRA's scale) and at 0 for
  ``softmax`` (lambda = 1/r, uniform) and ``binary`` (lambda = sigmoid(0) = 1/2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters.base import AdapterLayer, kaiming_uniform_
from ds_bilevel.adapters.fused import adapted_linear, fusable
from ds_bilevel.levels import Level, TrainingMode

if TYPE_CHECKING:  # annotations only (adapters/config.py sits above the layer files)
    from ds_bilevel.adapters.config import AdapterConfig


# How the pseudo singular values lambda are parameterised (adapter.lambda_param).
LAMBDA_PARAMS = ("real", "softmax", "binary")


class BiLoraLayer(AdapterLayer):
    """P, Q inner; the raw pseudo singular values ``lambda_raw`` outer."""

    training_mode = TrainingMode.BILEVEL

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 lambda_param: str = "softmax", orth_reg_weight: float = 0.1,
                 binary_reg_weight: float = 0.1):
        super().__init__(base_layer, rank, alpha, dropout)
        if lambda_param not in LAMBDA_PARAMS:
            raise ValueError(f"adapter.lambda_param: {lambda_param!r} is not one of {list(LAMBDA_PARAMS)}")
        self.lambda_param = lambda_param
        self.orth_reg_weight = orth_reg_weight
        self.binary_reg_weight = binary_reg_weight
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        self.lora_Q = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        kaiming_uniform_(self.lora_Q)
        raw_init = 1.0 if lambda_param == "real" else 0.0
        self.lambda_raw = nn.Parameter(torch.full((rank,), raw_init, **factory))  # (r,)

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: AdapterConfig) -> BiLoraLayer:
        return cls(base_layer, config.rank, config.alpha, config.dropout, config.lambda_param,
                   config.orth_reg_weight, config.binary_reg_weight)

    def _level_names(self, level: Level) -> tuple[str, ...]:
        return ("lora_P", "lora_Q") if level is Level.INNER else ("lambda_raw",)

    def lambdas(self) -> torch.Tensor:
        """The pseudo singular values lambda (r,), from the raw parameter."""
        raw = self.lambda_raw
        if self.lambda_param == "real":
            return raw
        # Normalise in fp32: a bf16 softmax over r entries loses the small ones.
        if self.lambda_param == "softmax":
            return torch.softmax(raw.float(), dim=0).to(raw.dtype)
        return torch.sigmoid(raw.float()).to(raw.dtype)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # s * P diag(lambda) Q x without forming the (out, in) product: (..., in) -> (..., r) -> (..., out).
        if fusable(self.base_layer):
            # One autograd node (adapters/fused.py), diag(lambda) and s folded into the small
            # factor P (out, r); its backward is differentiable again (the tests' double backward).
            b = self.lora_P * (self.lambdas() * self.scaling)
            return adapted_linear(x, self.dropout(x), self.base_layer, self.fan_in_fan_out, self.lora_Q, b)
        h = F.linear(self.dropout(x), self.lora_Q) * self.lambdas()
        return self.base_layer(x) + F.linear(h, self.lora_P) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_P * self.lambdas()) @ self.lora_Q) * self.scaling  # (out, in)

    def merged_weight(self) -> torch.Tensor:
        return self.base_weight() + self.delta_weight().to(self.base_layer.weight.dtype)

    # ---- regularisers ----------------------------------------------------------------
    def orthogonality(self) -> torch.Tensor:
        """R1 = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (the AdaLoRA form), both Gram matrices (r, r)."""
        p, q = self.lora_P.float(), self.lora_Q.float()
        eye = torch.eye(self.rank, device=p.device)
        return (p.T @ p - eye).square().sum() + (q @ q.T - eye).square().sum()

    def binary_penalty(self) -> torch.Tensor:
        """R2 = mean(lambda (1 - lambda)) for sigmoid lambda: 0 at 0/1, largest (1/4) at 1/2.

        lambda = 1/2 (the init) is a stationary point of R2, so only the task loss moves it
        off 1/2; from there R2 pushes each value towards the nearer of 0 and 1.
        """
        lam = torch.sigmoid(self.lambda_raw.float())
        return (lam * (1 - lam)).mean()

    def regularizer(self, level: Level) -> torch.Tensor | None:
        if level is Level.INNER:
            return self.orth_reg_weight * self.orthogonality() if self.orth_reg_weight > 0 else None
        if self.lambda_param == "binary" and self.binary_reg_weight > 0:
            return self.binary_reg_weight * self.binary_penalty()
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda={self.lambda_param}"


def peft_form(layer: BiLoraLayer) -> dict[str, torch.Tensor]:
    """PEFT LoRA's tensors of the same forward: A' = Q, B' = P diag(lambda) (P (out, r) times
    lambda (r,) scales P's columns), same r and alpha: s B' A' = s P diag(lambda) Q."""
    return {"lora_A.weight": layer.lora_Q, "lora_B.weight": layer.lora_P * layer.lambdas()}
