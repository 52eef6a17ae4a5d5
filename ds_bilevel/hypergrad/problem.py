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

from typing import Protocol

import torch

from ds_bilevel.levels import Objective

Tensors = list[torch.Tensor]


class BilevelProblem(Protocol):
    def gradients(self, objective: Objective) -> tuple[Tensors, Tensors]:
        """(grad_w, grad_lam) of ``objective`` at the current inner weights, full fp32 tensors,
        reduced over all ranks (every rank gets the same values)."""

    def perturb_inner(self, direction: Tensors | None,
                      scale: float | torch.Tensor = 0.0) -> float | torch.Tensor | None:
        """Evaluate later gradients at w + s * direction (w: the unperturbed fp32 weights) and return
        s: ``scale``, or a larger one of the same sign where the compute weights are too coarse
        for it (``applied_scale``); None means ``scale``. ``None`` as direction restores w exactly."""

    def inner_learning_rate(self) -> float:
        """The inner optimizer's current learning rate (xi of the original DARTS)."""


# The list operations below touch every inner parameter (hundreds of tensors at LLaMA scale,
# several times per outer step): each is a fixed number of (multi-tensor) ops whatever the
# number of tensors, not one or more per tensor, so that on a GPU they are a few kernels.


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """sum_i <a_i, b_i> in float64 (a 0-dim tensor on the tensors' device). Flat float64 copies of
    both lists, for a moment: cg's curvature and step, not the darts/neumann path (``norm``)."""
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.dot(torch.cat([x.reshape(-1) for x in a]).double(), torch.cat([y.reshape(-1) for y in b]).double())


def norm(a: Tensors) -> torch.Tensor:
    """sqrt(sum_i ||a_i||^2), a float64 0-dim tensor, from the tensors' norms in one multi-tensor
    op (no copy of the list: the step of every central difference reads it)."""
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(a)).double().square().sum().sqrt()


def axpy(alpha: float | torch.Tensor, x: Tensors, y: Tensors) -> Tensors:
    """alpha * x + y, elementwise over the lists (alpha a number or a 0-dim tensor)."""
    return torch._foreach_add(torch._foreach_mul(x, alpha), y)


def scaled_difference(a: Tensors, b: Tensors, width: float | torch.Tensor) -> Tensors:
    """(a - b) / width, elementwise over the lists."""
    return torch._foreach_div(torch._foreach_sub(a, b), width)


# Smallest perturbation radius, relative to the norm of the inner weights, for compute weights
# of a 16-bit dtype (issue 12 item 7, docs/methods.md). A bf16 weight keeps 8 significant
# bits: a move below half its spacing (2^-9 |w_i|) rounds back, so with the absolute radius
# eps the perturbation of a large adapter is mostly rounded away (the J.v error grows with the
# inner parameter count, bench/perturbation_bf16.py). fp32 and fp64 keep the absolute radius.
RELATIVE_RADIUS = {torch.bfloat16: 0.1, torch.float16: 0.1}


def perturbation_radius(eps: float | torch.Tensor, weights_norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm of the central-difference perturbation for compute weights of ``dtype``:
    max(eps, RELATIVE_RADIUS[dtype] * ||w||), and eps for fp32/fp64."""
    return torch.clamp(RELATIVE_RADIUS.get(dtype, 0.0) * weights_norm, min=eps)


def applied_scale(scale: float | torch.Tensor, direction: Tensors, weights: Tensors,
                  dtype: torch.dtype) -> float | torch.Tensor:
    """The scale s to apply for a requested ``scale`` (a number or a 0-dim tensor) along
    ``direction`` from ``weights`` when the forward computes with ``dtype``: ``scale`` itself for
    fp32/fp64 (bit for bit today's step), else widened so that the radius |s| ||direction|| is at
    least RELATIVE_RADIUS[dtype] ||w|| (a zero scale stays zero). A 0-dim device tensor: no host
    synchronisation. Every rank holds the same full tensors, so every rank gets the same s."""
    if dtype not in RELATIVE_RADIUS:
        return scale
    direction_norm = norm(direction).clamp_min(1e-30)
    scale = torch.as_tensor(scale, dtype=direction_norm.dtype, device=direction_norm.device)
    radius = perturbation_radius(scale.abs() * direction_norm, norm(weights), dtype)
    return torch.sign(scale) * radius / direction_norm


def _accelerator_rng():
    """The device module (torch.cuda, torch.xpu, ...) whose generator this process's forward uses,
    or None on CPU or before the device was ever initialised (then nothing was drawn on it)."""
    device = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if device is None:
        return None
    module = torch.get_device_module(device)
    initialised = getattr(module, "is_initialized", lambda: True)()
    return module if initialised and hasattr(module, "get_rng_state") else None


class SharedRandomness:
    """One random state for every perturbed inner-objective pass of one hypergradient.

    A central difference (g(w + t u) - g(w - t u)) / 2t assumes that the two gradients are of
    the same function: with dropout in train mode (adapter dropout, an encoder's hidden
    dropout) each pass would draw its own mask, and the difference of two masks, divided by
    2t, swamps J u (issue 12 item 6: up to 181% at dropout 0.1). So the first perturbed pass
    records the generators' state (torch's CPU generator and, where the forward runs on an
    accelerator, that device's) and every later one starts from it: w+ and w-, and all the
    Hessian-vector products of neumann and cg (one operator H, as their convergence assumes),
    see the same masks. Each rank replays its own generators, so this holds at every ZeRO
    stage and world size, and needs nothing from DeepSpeed; torch.utils.checkpoint restores
    the state it recomputes with, so activation checkpointing keeps the masks too. The stream
    afterwards is the recorded state advanced by one inner pass: deterministic, as before.
    """

    def __init__(self) -> None:
        self._state: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def replay(self) -> None:
        accelerator = _accelerator_rng()
        if self._state is None:
            self._state = (torch.get_rng_state(), accelerator.get_rng_state() if accelerator else None)
            return
        torch.set_rng_state(self._state[0])
        if accelerator is not None and self._state[1] is not None:
            accelerator.set_rng_state(self._state[1])


def second_order_products(problem: BilevelProblem, u: Tensors, eps: float,
                          randomness: SharedRandomness | None = None) -> tuple[Tensors, Tensors]:
    """(H u, J u) with H = d2 L_tr / dw2 and J = d2 L_tr / dlam dw, by central differences.

    The step is eps / ||u|| along u (DARTS' choice, as in Betty): the perturbation has
    norm eps whatever the scale of u. Two inner-objective passes; the error is O(eps^2).
    Both passes start from the random state of ``randomness`` (a hypergradient passes one for
    all its products; by default the two passes of this product share theirs).
    """
    randomness = randomness or SharedRandomness()
    # On the device (the double the host would compute): reading ||u|| here would make the host
    # wait for the pass that produced u before it could queue the perturbed ones.
    step = eps / norm(u).clamp_min(1e-30)  # u = 0: both passes agree and the products are 0
    plus = problem.perturb_inner(u, +step)
    randomness.replay()
    grad_w_plus, grad_lam_plus = problem.gradients(Objective.INNER)
    minus = problem.perturb_inner(u, -step)
    randomness.replay()
    grad_w_minus, grad_lam_minus = problem.gradients(Objective.INNER)
    problem.perturb_inner(None)
    # The problem may widen the step for 16-bit compute weights (applied_scale): divide by the
    # distance actually travelled along u.
    width = (step if plus is None else plus) - (-step if minus is None else minus)
    return scaled_difference(grad_w_plus, grad_w_minus, width), scaled_difference(grad_lam_plus, grad_lam_minus, width)
