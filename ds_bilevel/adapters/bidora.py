"""BiDoRA (arXiv 2410.09758): DoRA's layer, with the direction and the magnitude on two levels.

W' = m * (W0 + s B A) / ||W0 + s B A||_row, exactly DoRA's forward (inherited, so the
released code's bugs stay out: the weight is used untransposed, s = alpha / r is applied,
and dropout never touches the frozen path). The direction {A, B} is the inner level (D1),
the magnitude m the outer level (D2). Init is DoRA's: m = ||W0||_row, B = 0, A
Kaiming-uniform (the released code draws A from N(0, 1); see docs/methods.md).

Optional inner-level regulariser (the paper's lower objective): g_d * ||D^T D - I_in||_F
with D = (W0 + s B A) / ||W0 + s B A||_row, (out, in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ds_bilevel.adapters.dora import DoraLayer
from ds_bilevel.levels import Level, TrainingMode

if TYPE_CHECKING:  # annotations only (adapters/config.py sits above the layer files)
    from ds_bilevel.adapters.config import AdapterConfig


class BiDoraLayer(DoraLayer):
    """Direction (lora_A, lora_B) inner; magnitude outer."""

    training_mode = TrainingMode.BILEVEL
    # Not DoRA's detach: the released BiDoRA code (t2ance/BiDoRA) differentiates through the
    # norm, and the hypergradient differentiates the inner gradient again (H, J): with the norm
    # detached that "gradient" is not the gradient of the inner loss, and neumann/cg converge
    # to something else (docs/methods.md, tests/hypergrad/test_bidora_implicit.py).
    detach_norm_default = False

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 detach_norm: bool | None = None, direction_orth_weight: float = 0.0):
        super().__init__(base_layer, rank, alpha, dropout, detach_norm)
        self.direction_orth_weight = direction_orth_weight

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: AdapterConfig) -> BiDoraLayer:
        return cls(base_layer, config.rank, config.alpha, config.dropout, config.detach_norm,
                   config.direction_orth_weight)

    def _level_names(self, level: Level) -> tuple[str, ...]:
        return ("lora_A", "lora_B") if level is Level.INNER else ("magnitude",)

    def direction(self) -> torch.Tensor:
        """D = (W0 + s B A) / ||W0 + s B A||_row in fp32, (out, in).

        The norm is never detached here: ``detach_norm`` (DoRA section 4.3) is about the
        forward's activation-sized backward; this term has no activations, and with a
        detached norm its gradient would chase row lengths that D does not have.
        """
        weight = self.base_weight().float() + self.delta_weight().float()
        return weight / weight.norm(p=2, dim=1, keepdim=True)

    def direction_orthogonality(self) -> torch.Tensor:
        """||D^T D - I_in||_F, through the smaller of the two Gram matrices (exact either way).

        D^T D (in, in) and D D^T (out, out) share their nonzero eigenvalues, so
        ||D^T D||_F = ||D D^T||_F, and tr(D^T D) = tr(D D^T); hence
        ||D^T D - I_in||_F^2 = ||D D^T - I_out||_F^2 + (in - out).
        Cost: min(out, in)^2 * max(out, in) multiply-adds instead of in^2 * out.
        """
        d = self.direction()
        out_f, in_f = d.shape
        if in_f <= out_f:
            sq = (d.T @ d - torch.eye(in_f, device=d.device)).square().sum()
        else:
            # in - out >= 1 here, so sq > 0 and the square root below is smooth.
            sq = (d @ d.T - torch.eye(out_f, device=d.device)).square().sum() + (in_f - out_f)
        # sq = 0 only for a square orthogonal D; keep the sqrt's gradient finite there.
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()

    def regularizer(self, level: Level) -> torch.Tensor | None:
        if level is Level.INNER and self.direction_orth_weight > 0:
            return self.direction_orth_weight * self.direction_orthogonality()
        return None
