"""DARTS' finite-difference hypergradient (Liu et al. 2019, eq. 7-8), in Betty's form by default.

    v = grad_w L_val(w, lam)
    h = grad_lam L_val - xi * (grad_lam L_tr(w + e v) - grad_lam L_tr(w - e v)) / (2 e),  e = eps / ||v||

Betty's "darts" (used for BiDoRA's published numbers) takes xi = 1 and evaluates at the
current weights (the inner step has already been taken); the original form multiplies by
the inner learning rate xi. Both approximate the implicit gradient with H^-1 ~ xi I.
Cost: 3 passes (one on D2, two on D1).
"""

from ds_bilevel.bilevel_config import BilevelConfig
from ds_bilevel.hypergrad.problem import (
    BilevelProblem,
    Objective,
    SharedRandomness,
    Tensors,
    axpy,
    second_order_products,
)


def darts(problem: BilevelProblem, config: BilevelConfig) -> Tensors:
    v, grad_lam = problem.gradients(Objective.OUTER)
    _, mixed = second_order_products(problem, v, config.hypergrad_eps, SharedRandomness())
    xi = problem.inner_learning_rate() if config.darts_form == "original" else 1.0
    return axpy(-xi, mixed, grad_lam)
