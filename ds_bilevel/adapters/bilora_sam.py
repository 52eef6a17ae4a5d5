"""Bi-LoRA (arXiv 2508.19564): sharpness-aware LoRA in one pass, W = W0 + s B1 A1 + s B2 A2.

The primary module (lora_A = A1, lora_B = B1) descends and is the inner level; the
auxiliary module (aux_A = A2, aux_B = B2, rank ``aux_rank``) ascends and plays the outer
role. Both see the same forward and backward: the layer declares the levels, and with
``ascend_in_backward`` (set by the engine) its backward hands the auxiliary parameters the
negated gradient, so the optimizer's descent step is the ascent, with no extra pass and no
gradient read-back. After each step the auxiliary
modules are clipped together so that sqrt(sum_j ||s B2_j A2_j||_F^2) <= rho (the paper's
global clipping; per-layer clipping did worse in its ablation). Inference drops the
auxiliary module: ``merged_weight`` is LoRA's W0 + s B1 A1.

One scaling s = alpha / rank for both modules, as the paper's formula writes it; the clip
bounds s B2 A2 itself, so s only sets the size of the auxiliary gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ds_bilevel.adapters.base import kaiming_uniform_
from ds_bilevel.adapters.fused import ReverseGrad, adapted_linear, fusable
from ds_bilevel.adapters.lora import LoraLayer
from ds_bilevel.levels import Level, TrainingMode
from ds_bilevel.zero_access import gathered, scale_compute_weights_

if TYPE_CHECKING:  # annotations only (adapters/config.py sits above the layer files)
    from ds_bilevel.adapters.config import AdapterConfig


class _AscendingLowRank(torch.autograd.Function):
    """s B2 A2 x, whose backward gives x its true gradient and A2, B2 their negated ones: the
    ascent happens in backward, as a gradient-reversal layer (Ganin and Lempitsky, 2015) on the
    parameters alone. It saves the parameters themselves, not views of them: ZeRO-3 gathers a
    parameter's data again before its layer's backward, but a view taken in forward keeps the
    storage ZeRO-3 released after it (a crash at ZeRO-3 without activation checkpointing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        hidden = F.linear(x, a)  # (..., r2): A2 x, kept for B2's gradient
        ctx.save_for_backward(x, a, b, hidden)
        ctx.scaling = scaling
        return F.linear(hidden, b) * scaling

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, hidden = ctx.saved_tensors
        grad = grad * ctx.scaling
        grad_hidden = grad @ b  # (..., r2)
        grad_b = grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1])  # (out, r2)
        grad_a = grad_hidden.reshape(-1, grad_hidden.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (r2, in)
        return grad_hidden @ a, -grad_a, -grad_b, None


class BiLoraSamLayer(LoraLayer):
    """Primary (lora_A, lora_B) inner; auxiliary (aux_A, aux_B) outer."""

    training_mode = TrainingMode.SHARPNESS
    auxiliary_enabled = True
    """False: the forward leaves s B2 A2 out, computing the model that inference and the export
    get (W0 + s B1 A1); evaluation turns it off for its duration (evaluation.inference_forward)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 aux_rank: int = 8):
        super().__init__(base_layer, rank, alpha, dropout)
        self.aux_rank = aux_rank
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        # Same init as the primary module: B2 = 0 keeps the model a no-op at step 0, and a
        # random A2 lets the first ascent step move B2 (with A2 = 0 too, neither would move).
        self.aux_A = nn.Parameter(torch.empty(aux_rank, self.in_features, **factory))  # (r2, in)
        self.aux_B = nn.Parameter(torch.zeros(self.out_features, aux_rank, **factory))  # (out, r2)
        kaiming_uniform_(self.aux_A)

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: AdapterConfig) -> BiLoraSamLayer:
        return cls(base_layer, config.rank, config.alpha, config.dropout, config.aux_rank)

    @classmethod
    def rank_fields(cls, config: AdapterConfig) -> dict[str, int]:
        return {"rank": config.rank, "aux_rank": config.aux_rank}

    def _level_names(self, level: Level) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if level is Level.INNER else ("aux_A", "aux_B")

    def auxiliary(self, x: torch.Tensor) -> torch.Tensor:
        """s B2 A2 x for (already dropped-out) activations, never forming B2 A2."""
        if self.ascend_in_backward and torch.is_grad_enabled():
            return _AscendingLowRank.apply(x, self.aux_A, self.aux_B, self.scaling)
        return F.linear(F.linear(x, self.aux_A), self.aux_B) * self.scaling

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.auxiliary_enabled:
            return super().adapted_forward(x)  # LoRA's W0 + s B1 A1 (inference, the export)
        x_drop = self.dropout(x)  # one mask for both modules: they perturb the same weight
        if fusable(self.base_layer):
            # Both modules as one rank-(r + r2) product s [B1 B2] [A1; A2] x in one node
            # (adapters/fused.py): x and the output gradient are read once, 2 matmuls forward and
            # 3 backward for the two modules; the auxiliary factors pass through a gradient
            # reversal first when they ascend in backward (as _AscendingLowRank does alone).
            aux_a, aux_b = self.aux_A, self.aux_B
            if self.ascend_in_backward and torch.is_grad_enabled():
                aux_a, aux_b = ReverseGrad.apply(aux_a), ReverseGrad.apply(aux_b)
            a = torch.cat([self.lora_A, aux_a])  # (r + r2, in)
            b = torch.cat([self.lora_B, aux_b], dim=1) * self.scaling  # (out, r + r2)
            return adapted_linear(x, x_drop, self.base_layer, self.fan_in_fan_out, a, b)
        out = self.base_layer(x) + self.low_rank(x_drop)
        return out + self.auxiliary(x_drop)

    # merged_weight is LoraLayer's W0 + s B1 A1: the auxiliary module is dropped at inference.

    def auxiliary_sq_norm(self) -> torch.Tensor:
        """||s B2 A2||_F^2 = s^2 tr((B2^T B2)(A2 A2^T)) from two (r2, r2) Gram matrices, in fp32."""
        a, b = self.aux_A.float(), self.aux_B.float()
        # Both Gram matrices are symmetric, so tr(X Y) = sum(X * Y).
        return (b.T @ b * (a @ a.T)).sum() * self.scaling**2

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, aux_rank={self.aux_rank}"


def auxiliary_layers(model: nn.Module) -> list[BiLoraSamLayer]:
    return [m for m in model.modules() if isinstance(m, BiLoraSamLayer)]


def auxiliary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every aux_A and aux_B of ``model``, layer by layer."""
    return [p for layer in auxiliary_layers(model) for p in (layer.aux_A, layer.aux_B)]


def auxiliary_sq_norm(model: nn.Module) -> torch.Tensor:
    """sum_j ||s B2_j A2_j||_F^2 over the auxiliary modules of ``model``, an fp32 scalar, from the
    weights the forward uses: whole at ZeRO 0-2, gathered in one call at ZeRO-3 (collective: call
    on every rank; every rank then gets the full sum and must not all-reduce it again).

    Layers of the same factor shapes (a LLaMA block's q/k/v/o/gate/up/down, repeated over the
    blocks) are stacked and take one batched product, so the op count is per shape, not per layer
    (on a GPU: a handful of kernels for all 224 layers of LLaMA-3-8B instead of 5 per layer)."""
    layers = auxiliary_layers(model)
    if not layers:
        return torch.zeros(())
    with gathered(auxiliary_parameters(model)), torch.no_grad():
        groups: dict[tuple, list[BiLoraSamLayer]] = {}  # by the whole shapes (gathered, at ZeRO-3)
        for layer in layers:
            groups.setdefault((layer.aux_A.shape, layer.aux_B.shape, layer.scaling), []).append(layer)
        terms = []
        for (_, _, scaling), group in groups.items():
            a = torch.stack([layer.aux_A for layer in group]).float()  # (n, r2, in)
            b = torch.stack([layer.aux_B for layer in group]).float()  # (n, out, r2)
            # tr((B2^T B2)(A2 A2^T)) per layer, as BiLoraSamLayer.auxiliary_sq_norm, summed over the group
            terms.append((b.mT @ b * (a @ a.mT)).sum() * scaling**2)
        return torch.stack(terms).sum()


ScaleFn = Callable[[list[nn.Parameter], torch.Tensor | float], None]
"""Multiplies trained parameters by a factor in place: their compute weights by default
(``zero_access.scale_compute_weights_``); an engine that keeps fp32 masters scales those too."""


@torch.no_grad()
def scale_auxiliary_(model: nn.Module, factor: torch.Tensor | float, scale_: ScaleFn = scale_compute_weights_) -> None:
    """Multiply every aux_A and aux_B of ``model`` by ``factor`` in place, with ``scale_``."""
    scale_(auxiliary_parameters(model), factor)


def clip_factor(norm: torch.Tensor | float, rho: float) -> torch.Tensor:
    """sqrt(rho / c) when c > rho, else exactly 1, as a tensor on c's device (deciding on the host
    would wait for the device): scaling both factors by it scales each B2 A2 by rho / c."""
    norm = torch.as_tensor(norm, dtype=torch.float32)
    return torch.where(norm > rho, (rho / norm.clamp_min(rho)).sqrt(), torch.ones_like(norm))


def clip_auxiliary_(model: nn.Module, rho: float, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    scale_: ScaleFn = scale_compute_weights_) -> torch.Tensor:
    """The global clip of the auxiliary modules to c = sqrt(sum_j ||s B2_j A2_j||_F^2) <= rho;
    returns c. The one implementation: the engine and the reference both call it (through
    ``after_step``).

    c is the same on every rank (``auxiliary_sq_norm``); every rank scales its share of every
    B2 and A2 by sqrt(rho / c) if c > rho, else by exactly 1 (bit for bit a no-op), with
    ``scale_``: no per-parameter communication and no host sync to decide (the factor stays on
    the device). ``all_reduce`` sums the squared norm over processes that hold disjoint shares
    of the auxiliary modules (leave it None when every process sees them all).
    """
    sq = auxiliary_sq_norm(model)
    if all_reduce is not None:
        sq = all_reduce(sq)
    norm = sq.sqrt()
    scale_auxiliary_(model, clip_factor(norm, rho), scale_)
    return norm


def after_step(model: nn.Module, config: AdapterConfig, scale_: ScaleFn) -> None:
    """Bi-LoRA's projection after each optimizer step (the method registry's ``after_step``):
    the global clip to ``config.rho``."""
    clip_auxiliary_(model, config.rho, scale_=scale_)
