"""Hypergradient methods for the outer level, one small file each (Betty's layout).

Each takes a ``BilevelProblem`` and the ``BilevelConfig`` and returns the outer gradient h,
one tensor per outer parameter.
"""

from ds_bilevel.bilevel_config import HYPERGRAD_METHODS, BilevelConfig
from ds_bilevel.hypergrad.cg import cg
from ds_bilevel.hypergrad.darts import darts
from ds_bilevel.hypergrad.first_order import first_order
from ds_bilevel.hypergrad.neumann import neumann
from ds_bilevel.hypergrad.problem import BilevelProblem, Objective

HYPERGRADS = {"first_order": first_order, "darts": darts, "neumann": neumann, "cg": cg}
assert tuple(HYPERGRADS) == HYPERGRAD_METHODS

__all__ = ["HYPERGRADS", "BilevelConfig", "BilevelProblem", "Objective"]
