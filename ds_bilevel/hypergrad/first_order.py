"""First order: h = grad_lam L_val(w, lam), ignoring how the inner solution w depends on lam."""

from ds_bilevel.bilevel_config import BilevelConfig
from ds_bilevel.hypergrad.problem import BilevelProblem, Objective, Tensors


def first_order(problem: BilevelProblem, config: BilevelConfig) -> Tensors:
    _, grad_lam = problem.gradients(Objective.OUTER)
    return grad_lam
