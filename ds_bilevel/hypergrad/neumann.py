"""Implicit differentiation with a K-term Neumann series (Lorraine et al. 2020, eq. 5).

    H^-1 v ~ alpha * sum_{k=0..K} (I - alpha H)^k v,   h = grad_lam L_val - J (H^-1 v)

It converges to the implicit hypergradient as K grows when 0 < alpha < 2 / lambda_max(H).
Cost: 2K + 3 passes (one on D2, 2 per Hessian-vector product, 2 for J p).
"""

import torch

from ds_bilevel.bilevel_config import BilevelConfig
from ds_bilevel.hypergrad.problem import (
    BilevelProblem,
    Objective,
    SharedRandomness,
    Tensors,
    axpy,
    second_order_products,
)


def neumann(problem: BilevelProblem, config: BilevelConfig) -> Tensors:
    v, grad_lam = problem.gradients(Objective.OUTER)
    alpha = config.neumann_alpha or problem.inner_learning_rate()
    randomness = SharedRandomness()  # one dropout mask for every product: one operator H
    term, total = v, list(v)
    for _ in range(config.neumann_terms):
        hvp, _ = second_order_products(problem, term, config.hypergrad_eps, randomness)
        term = axpy(-alpha, hvp, term)  # (I - alpha H) term
        total = axpy(1.0, term, total)
    inverse_hvp = torch._foreach_mul(total, alpha)
    _, mixed = second_order_products(problem, inverse_hvp, config.hypergrad_eps, randomness)
    return axpy(-1.0, mixed, grad_lam)
