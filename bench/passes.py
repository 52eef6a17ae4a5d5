"""Analytic cost of a method in forward/backward passes per inner step, counted from the code.

A pass is a forward/backward over one global batch. Rather than restating the cost table of
docs/design.md, this walks ``ds_bilevel.schedule.events`` for the method's mode and runs the
configured hypergradient function (ds_bilevel/hypergrad/) on a small quadratic bi-level
problem that counts its ``gradients`` calls: an inner or sharpness step is one pass, an outer
step costs whatever its hypergradient asks for.
"""

from __future__ import annotations

import torch

from ds_bilevel.adapters.registry import METHODS
from ds_bilevel.hypergrad import HYPERGRADS, BilevelConfig
from ds_bilevel.levels import Objective, StepKind, TrainingMode
from ds_bilevel.schedule import events


class CountingProblem:
    """L_tr = 1/2 w^T diag(d) w - lam . w, L_val = 1/2 |w - 1|^2 + |lam|^2: a positive-definite
    inner Hessian with distinct eigenvalues, so CG runs its K iterations. Counts passes."""

    def __init__(self, size: int = 8):
        self.curvature = torch.linspace(1.0, 4.0, size, dtype=torch.float64)
        self.w = torch.ones(size, dtype=torch.float64) * 0.5
        self.lam = torch.full((size,), 0.1, dtype=torch.float64)
        self.offset = torch.zeros(size, dtype=torch.float64)
        self.passes = 0

    def gradients(self, objective: Objective):
        self.passes += 1
        w = self.w + self.offset
        if objective is Objective.INNER:
            return [self.curvature * w - self.lam], [-w]
        return [w - 1.0], [2.0 * self.lam]

    def perturb_inner(self, direction, scale: float = 0.0) -> None:
        self.offset = torch.zeros_like(self.w) if direction is None else scale * direction[0]

    def inner_learning_rate(self) -> float:
        return 0.1


def passes_per_outer_step(config: BilevelConfig) -> int:
    problem = CountingProblem()
    HYPERGRADS[config.hypergrad](problem, config)
    return problem.passes


def passes_per_inner_step(method: str, config: BilevelConfig | None = None, inner_steps: int = 60) -> float:
    """Passes per inner step over ``inner_steps`` steps of the method's schedule."""
    config = config or BilevelConfig()
    mode = METHODS[method].training_mode
    outer_cost = passes_per_outer_step(config) if mode is TrainingMode.BILEVEL else 0
    total = sum(outer_cost if kind == StepKind.OUTER else 1
                for kind, _ in events(mode, inner_steps, config.unroll_steps, config.outer_steps))
    return total / inner_steps


def analytic_passes(method: str, hypergrad: str | None = None, unroll: int = 1) -> float:
    """Passes per inner step of a method (``hypergrad`` and ``unroll`` for bilora/bidora)."""
    return passes_per_inner_step(method, BilevelConfig(hypergrad=hypergrad or "first_order", unroll_steps=unroll))


def method_args(method: str, hypergrad: str | None = None, unroll: int = 1) -> list[str]:
    """launch/train.py flags selecting the method (and its hypergradient and unroll steps)."""
    args = ["--method", method]
    return args + (["--hypergrad", hypergrad, "--unroll_steps", str(unroll)] if hypergrad else [])
