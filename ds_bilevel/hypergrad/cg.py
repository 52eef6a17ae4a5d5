"""Implicit differentiation with K conjugate-gradient steps for H p = v (Rajeswaran et al. 2019).

    h = grad_lam L_val - J p,  p ~ H^-1 v after K CG iterations from p = 0

Exact after as many iterations as the inner dimension for a positive-definite H; CG stops
early if it meets a direction of non-positive curvature (H is not positive definite away
from an inner minimum) and keeps the iterate it has.
Cost: 2K + 3 passes.
"""

from ds_bilevel.bilevel_config import BilevelConfig
from ds_bilevel.hypergrad.problem import (
    BilevelProblem,
    Objective,
    SharedRandomness,
    Tensors,
    axpy,
    dot,
    second_order_products,
)


def cg(problem: BilevelProblem, config: BilevelConfig) -> Tensors:
    v, grad_lam = problem.gradients(Objective.OUTER)
    solution = [0.0 * x for x in v]
    residual, direction = list(v), list(v)
    residual_sq = dot(residual, residual)
    randomness = SharedRandomness()  # one dropout mask for every product: one operator H
    for _ in range(config.cg_steps):
        if residual_sq.item() == 0.0:
            break
        hvp, _ = second_order_products(problem, direction, config.hypergrad_eps, randomness)
        curvature = dot(direction, hvp)
        if curvature.item() <= 0.0:
            break
        step = (residual_sq / curvature).item()
        solution = axpy(step, direction, solution)
        residual = axpy(-step, hvp, residual)
        new_sq = dot(residual, residual)
        direction = axpy((new_sq / residual_sq).item(), direction, residual)
        residual_sq = new_sq
    _, mixed = second_order_products(problem, solution, config.hypergrad_eps, randomness)
    return axpy(-1.0, mixed, grad_lam)
