"""Adapter settings, shared by every method (a method reads the fields it needs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ds_bilevel.adapters.bilora import LAMBDA_PARAMS
from ds_bilevel.adapters.registry import method

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The default: every linear layer of the transformer blocks, not the output head (PEFT's
# target_modules="all-linear"); adapters/inject.py resolves it against the model.
ALL_LINEAR = "all-linear"


@dataclass
class AdapterConfig:
    method: str = "lora"
    """lora | dora (one-level baselines) | bilora | bidora | bilora_sam (``adapters.registry.METHODS``)."""
    rank: int = 8
    """r: rank of the low-rank update."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by s = alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter path only (never on the frozen path)."""
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """all-linear (every linear layer but the output head and a classifier's head, as PEFT), or names
    (last component, e.g. q_proj, or a full dotted name) of the nn.Linear / Conv1D layers to adapt."""
    # Annotated bool (the command line parses it as one); None until validate() fills in the method's default.
    detach_norm: bool = None  # type: ignore[assignment]
    """DoRA/BiDoRA: treat the row norm ||W0 + s B A||_row as a constant in backward (DoRA section 4.3).
    Unset: the method's default, true for dora (PEFT's choice), false for bidora (the released BiDoRA
    code; its hypergradient needs the true gradient of the inner loss, docs/methods.md)."""
    lambda_param: str = "softmax"
    """BiLoRA: how the pseudo singular values lambda are parameterised: real | softmax | binary
    (sigmoid, pushed to 0/1 by ``binary_reg_weight``). Softmax did best in the paper's ablation."""
    orth_reg_weight: float = 0.1
    """BiLoRA: weight g1 of the inner-level orthogonality regulariser ||P^T P - I||^2 + ||Q Q^T - I||^2
    (0 turns it off)."""
    binary_reg_weight: float = 0.1
    """BiLoRA with lambda_param=binary: weight g2 of the outer-level regulariser mean(lambda (1 - lambda))
    that pushes lambda to 0/1 (0 turns it off)."""
    direction_orth_weight: float = 0.0
    """BiDoRA: weight g_d of the inner-level regulariser ||D^T D - I||_F on the row-normalised direction
    D (0 = off, the default; the paper's scripts use 1e-5). Costs min(out, in)^2 * max(out, in)
    multiply-adds per layer per step."""
    aux_rank: int = 8
    """Bi-LoRA (bilora_sam): rank r2 of the auxiliary (ascent) module B2 A2."""
    rho: float = 0.05
    """Bi-LoRA (bilora_sam): radius of the global clip sqrt(sum ||s B2 A2||_F^2) <= rho."""

    def validate(self) -> None:
        for name, value in method(self.method).defaults.items():  # a ValueError for an unknown method
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.detach_norm is None:  # a method that never reads it
            self.detach_norm = True
        if not isinstance(self.detach_norm, bool):
            raise ValueError(f"adapter.detach_norm: {self.detach_norm!r} must be true or false (unset: the "
                             f"method's default)")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"adapter.rank: {self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha: {self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout: {self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("adapter.target_modules: empty; give at least one linear-layer name")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"adapter.target_modules: {self.target_modules} mixes {ALL_LINEAR} with names; allowed: "
                             f"{ALL_LINEAR} alone, or layer names")
        if self.lambda_param not in LAMBDA_PARAMS:
            raise ValueError(f"adapter.lambda_param: {self.lambda_param!r} is not one of "
                             f"{list(LAMBDA_PARAMS)}")
        for name in ("orth_reg_weight", "binary_reg_weight", "direction_orth_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"adapter.{name}: {value!r} must be a finite number >= 0 (0 turns it off)")
        if not (isinstance(self.aux_rank, int) and self.aux_rank >= 1):
            raise ValueError(f"adapter.aux_rank: {self.aux_rank!r} must be an integer >= 1")
        if not (isinstance(self.rho, (int, float)) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"adapter.rho: {self.rho!r} must be a finite number > 0")
