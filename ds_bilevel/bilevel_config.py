"""BilevelConfig: the ``bilevel:`` section of the run settings (``--bilevel.<name>``).

Most of it is the bi-level schedule (schedule.py): T1 = unroll_steps and T2 = outer_steps, the
D1/D2 split (split_ratio) and the retraining phase (retrain_*); then the outer level's own
optimizer settings (outer_*), and the hypergradient of an outer step (hypergrad/: hypergrad,
hypergrad_eps, darts_form, neumann_*, cg_steps). Plain data, no torch: the command line's help
reads it from this source (config.py). Before issue 15 this was hypergrad/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

HYPERGRAD_METHODS = ("first_order", "darts", "neumann", "cg")
DARTS_FORMS = ("betty", "original")


@dataclass
class BilevelConfig:
    hypergrad: str = "darts"
    """first_order | darts | neumann | cg: how the outer gradient accounts for the inner solution."""
    unroll_steps: int = 1
    """T1: inner steps (on D1) between outer phases (BiDoRA's code: 1)."""
    outer_steps: int = 1
    """T2: outer steps (on D2) per outer phase."""
    split_ratio: float = 0.8
    """Share of the training data in D1 (inner level); the rest is D2 (outer level). Papers: 0.8."""
    outer_learning_rate: float = 0.0
    """Peak learning rate of the outer level (0: the same as learning_rate)."""
    outer_weight_decay: float = 0.0
    """Decoupled weight decay of the outer level (BiDoRA's scripts decay the magnitude, 0 to 1)."""
    outer_max_grad_norm: float = -1.0
    """Gradient-norm clipping of the outer level's steps, on its own norm (-1: the same value as
    max_grad_norm; 0: off, as Betty's default and the released BiDoRA code). Each level is clipped
    by its own norm; Bi-LoRA's joint step uses max_grad_norm."""
    hypergrad_eps: float = 0.01
    """Central-difference step: the inner weights move by eps / ||u|| * u (DARTS and Betty use 0.01)."""
    darts_form: str = "betty"
    """betty: h = g_val - J v (Betty's darts, used for BiDoRA's numbers); original: h = g_val - xi J v
    with xi the inner learning rate (Liu et al. 2019)."""
    neumann_terms: int = 3
    """K: terms of the Neumann series for the inverse Hessian-vector product."""
    neumann_alpha: float = 0.0
    """Step of the Neumann series, p = alpha sum_k (I - alpha H)^k v (0: the inner learning rate; the
    correction then shrinks with the learning rate, about 0.008x darts' at lr 2e-3 and K 3; Betty uses
    alpha 1 and K 1, docs/methods.md)."""
    cg_steps: int = 3
    """K: conjugate-gradient iterations for H p = v."""
    retrain_steps: int = 0
    """BiDoRA's retraining phase: after the bi-level steps, freeze the outer level and train the inner
    level again from its initial values on all the training data (D1 + D2) for N steps (0: none)."""
    retrain_learning_rate: float = 0.0
    """Peak learning rate of the inner level in the retraining phase (0: the same as learning_rate;
    the released BiDoRA code's retrain_lr)."""
    retrain_weight_decay: float = -1.0
    """Decoupled weight decay of the inner level in the retraining phase (-1: the same as weight_decay,
    as the released BiDoRA code falls back)."""
    retrain_warmup_ratio: float = -1.0
    """Share of retrain_steps spent warming the retraining learning rate up from 0 (-1: the same as
    warmup_ratio; the released BiDoRA code uses 0.1)."""

    def validate(self) -> None:
        if self.hypergrad not in HYPERGRAD_METHODS:
            raise ValueError(f"bilevel.hypergrad: {self.hypergrad!r} is not one of {list(HYPERGRAD_METHODS)}")
        if self.darts_form not in DARTS_FORMS:
            raise ValueError(f"bilevel.darts_form: {self.darts_form!r} is not one of {list(DARTS_FORMS)}")
        for name in ("unroll_steps", "outer_steps", "neumann_terms", "cg_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"bilevel.{name}: {value!r} must be an integer >= 1")
        if not 0.0 < self.split_ratio < 1.0:
            raise ValueError(f"bilevel.split_ratio: {self.split_ratio!r} must be in (0, 1)")
        if not self.hypergrad_eps > 0:
            raise ValueError(f"bilevel.hypergrad_eps: {self.hypergrad_eps!r} must be > 0")
        for name in ("outer_learning_rate", "outer_weight_decay", "neumann_alpha", "retrain_steps",
                     "retrain_learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"bilevel.{name}: {getattr(self, name)!r} must be >= 0")
        if not (self.outer_max_grad_norm >= 0 or self.outer_max_grad_norm == -1):
            raise ValueError(f"bilevel.outer_max_grad_norm: {self.outer_max_grad_norm!r} must be >= 0, or -1 (the "
                             f"same as max_grad_norm)")
        if not (self.retrain_weight_decay >= 0 or self.retrain_weight_decay == -1):
            raise ValueError(f"bilevel.retrain_weight_decay: {self.retrain_weight_decay!r} must be >= 0, or -1 (the "
                             f"same as weight_decay)")
        if not (0 <= self.retrain_warmup_ratio < 1 or self.retrain_warmup_ratio == -1):
            raise ValueError(f"bilevel.retrain_warmup_ratio: {self.retrain_warmup_ratio!r} must be in [0, 1), or -1 "
                             f"(the same as warmup_ratio)")

    def passes_per_outer_step(self) -> int:
        """Forward/backward passes over one global batch that one outer step costs."""
        return {"first_order": 1, "darts": 3, "neumann": 2 * self.neumann_terms + 3,
                "cg": 2 * self.cg_steps + 3}[self.hypergrad]


def detach_norm_warning(method: str, detach_norm: bool | None, hypergrad: str) -> str | None:
    """A one-line warning when BiDoRA's norm is detached under an implicit hypergradient, else None.

    neumann and cg approximate H^-1 v and J p of the inner loss; with the norm detached (DoRA
    section 4.3) the passes measure the Jacobians of a field that is not that loss's gradient, so
    they converge to something else (docs/methods.md, BiDoRA). Allowed, as an explicit choice."""
    if method == "bidora" and detach_norm and hypergrad in ("neumann", "cg"):
        return (f"adapter.detach_norm: true with bilevel.hypergrad {hypergrad}: the inner gradient is then not the "
                f"gradient of the inner loss and {hypergrad} does not approach the implicit hypergradient "
                f"(docs/methods.md); BiDoRA's default is false")
    return None
