"""The central-difference step survives bf16 compute weights (issue 12, item 7).

An emulation of the engine under bf16: two BiDoRA layers (d = 128, r = 16: 8192 inner
parameters) whose compute weights are bf16 values (the frozen base, the magnitude, and the
perturbed direction master + s u rounded to bf16, as engine.perturb_inner writes them), while
the arithmetic is float64, so that only the rounding of the perturbation is measured. J v from
``second_order_products`` is compared with the exact J v (float64 double backward at the fp32
masters, nothing rounded).
"""

from __future__ import annotations

import torch
from torch import nn

from ds_bilevel.adapters import AdapterConfig, BiDoraLayer
from ds_bilevel.hypergrad import Objective
from ds_bilevel.hypergrad.problem import applied_scale, second_order_products

WIDTH, RANK, TOKENS = 128, 16, 32


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class Bf16WeightsProblem:
    """A BilevelProblem over a two-layer BiDoRA block whose inner compute weights are bf16-rounded."""

    def __init__(self, widen: bool):
        torch.manual_seed(0)
        config = AdapterConfig(method="bidora", rank=RANK, alpha=2.0 * RANK)
        self.layers = nn.ModuleList(BiDoraLayer.from_config(nn.Linear(WIDTH, WIDTH, dtype=torch.float64), config)
                                    for _ in range(2))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in self.layers:
                layer.base_layer.weight.copy_(bf16(layer.base_layer.weight))
                layer.base_layer.bias.copy_(bf16(layer.base_layer.bias))
                layer.lora_B.copy_(0.005 * torch.randn(layer.lora_B.shape, generator=g))  # a trained state
                layer.magnitude.copy_(bf16(layer.magnitude * (1 + 0.01 * torch.randn(WIDTH, generator=g))))
        self.inner = [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]
        self.outer = [layer.magnitude for layer in self.layers]
        self.masters = [p.detach().clone() for p in self.inner]  # the fp32 (here fp64) masters
        self.data = {objective: (torch.randn(TOKENS, WIDTH, generator=g), torch.randn(TOKENS, WIDTH, generator=g))
                     for objective in Objective}
        self.widen = widen
        self._write(self.masters)

    def loss(self, objective):
        x, target = self.data[objective]
        out = self.layers[1](torch.tanh(self.layers[0](x)))
        return (out - target).square().mean()

    def gradients(self, objective):
        grads = torch.autograd.grad(self.loss(objective), self.inner + self.outer)
        return list(grads[:len(self.inner)]), list(grads[len(self.inner):])

    @torch.no_grad()
    def _write(self, values):
        for param, value in zip(self.inner, values, strict=True):
            param.copy_(bf16(value))  # write_compute_weight into a bf16 weight

    def perturb_inner(self, direction, scale=0.0):
        if direction is None:
            self._write(self.masters)
            return None
        if self.widen:  # the engine's rule for bf16 compute weights
            scale = applied_scale(scale, direction, self.masters, torch.bfloat16)
        self._write([m + scale * d for m, d in zip(self.masters, direction, strict=True)])
        return scale

    def inner_learning_rate(self):
        return 1e-4

    def exact_mixed_product(self, v):
        with torch.no_grad():
            for param, master in zip(self.inner, self.masters, strict=True):
                param.copy_(master)
        grad_w = torch.autograd.grad(self.loss(Objective.INNER), self.inner, create_graph=True)
        jv = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grad_w, v, strict=True)), self.outer)
        self._write(self.masters)
        return jv


def jv_error(widen: bool, eps: float = 0.01) -> float:
    problem = Bf16WeightsProblem(widen)
    v, _ = problem.gradients(Objective.OUTER)
    _, mixed = second_order_products(problem, v, eps)
    exact = problem.exact_mixed_product(v)
    num = sum((a - b).square().sum() for a, b in zip(mixed, exact, strict=True)).sqrt()
    return (num / sum(b.square().sum() for b in exact).sqrt()).item()


def test_absolute_step_is_rounded_away_at_this_size(float64):
    """Today's step (radius eps = 0.01 whatever the weights) under bf16 weights: over 1% off."""
    assert jv_error(widen=False) > 0.01


def test_default_step_keeps_bf16_jv_error_below_one_percent(float64):
    assert jv_error(widen=True) < 0.01


def test_fp32_weights_keep_the_requested_step_bit_for_bit():
    direction = [torch.randn(3, 4), torch.randn(5)]
    weights = [torch.randn(3, 4), torch.randn(5)]
    for dtype in (torch.float32, torch.float64):
        assert applied_scale(0.125, direction, weights, dtype) == 0.125
    widened = applied_scale(-1e-6, direction, weights, torch.bfloat16)
    assert widened < -1e-6
