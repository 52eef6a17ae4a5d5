"""What a hypergradient method needs from a bi-level problem, and the shared second-order product.

The methods are written once against ``BilevelProblem`` and run unchanged on the
plain-PyTorch reference (reference.py) and on the DeepSpeed engine (engine.py). Every
second-order quantity is obtained from first-order gradients at perturbed inner weights
(central differences): double backward is not supported under ZeRO-3 (DeepSpeed #3539,
#7352), while a forward/backward at perturbed weights works at every stage.

Notation: w the inner parameters, lam the outer ones, L_tr the inner objective (on D1, with
the inner regularisers), L_val the outer objective (on D2, with the outer regularisers).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

import torch

Tensors = list[torch.Tensor]


class Objective(str, Enum):
    INNER = "inner"  # L_tr on a D1 batch
    OUTER = "outer"  # L_val on a D2 batch


class BilevelProblem(Protocol):
    def gradients(self, objective: Objective) -> tuple[Tensors, Tensors]:
        """(grad_w, grad_lam) of ``objective`` at the current inner weights, full fp32 tensors,
        reduced over all ranks (every rank gets the same values)."""

    def perturb_inner(self, direction: Tensors | None, scale: float = 0.0) -> None:
        """Evaluate later gradients at w + scale * direction (w: the unperturbed fp32 weights);
        ``None`` restores w exactly."""

    def inner_learning_rate(self) -> float:
        """The inner optimizer's current learning rate (xi of the original DARTS)."""


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def norm(a: Tensors) -> torch.Tensor:
    return dot(a, a).sqrt()


def axpy(alpha: float | torch.Tensor, x: Tensors, y: Tensors) -> Tensors:
    """alpha * x + y, elementwise over the lists."""
    return [alpha * xi + yi for xi, yi in zip(x, y, strict=True)]


def second_order_products(problem: BilevelProblem, u: Tensors, eps: float) -> tuple[Tensors, Tensors]:
    """(H u, J u) with H = d2 L_tr / dw2 and J = d2 L_tr / dlam dw, by central differences.

    The step is eps / ||u|| along u (DARTS' choice, as in Betty): the perturbation has
    norm eps whatever the scale of u. Two inner-objective passes; the error is O(eps^2).
    """
    step = eps / max(norm(u).item(), 1e-30)  # u = 0: both passes agree and the products are 0
    problem.perturb_inner(u, +step)
    grad_w_plus, grad_lam_plus = problem.gradients(Objective.INNER)
    problem.perturb_inner(u, -step)
    grad_w_minus, grad_lam_minus = problem.gradients(Objective.INNER)
    problem.perturb_inner(None)
    hvp = [(p - m) / (2 * step) for p, m in zip(grad_w_plus, grad_w_minus, strict=True)]
    mixed = [(p - m) / (2 * step) for p, m in zip(grad_lam_plus, grad_lam_minus, strict=True)]
    return hvp, mixed
