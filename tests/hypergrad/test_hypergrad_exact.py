"""Each hypergradient method against the exact implicit hypergradient of a small problem.

Inner: a logistic loss with per-coordinate penalties exp(M lam) * (w^2 / 2 + log cosh w)
(strongly convex in w),
solved to machine precision by Newton's method. Outer: a held-out logistic loss plus a
small penalty on lam. The exact hypergradient at the inner solution w*(lam) is

    dF/dlam = grad_lam L_val - (d2 L_tr / dlam dw) H^-1 grad_w L_val,

computed in float64 with autograd and an explicit Hessian solve.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import relative_error

from ds_bilevel.hypergrad import HYPERGRADS, BilevelConfig, Objective

N_INNER, N_OUTER = 6, 3


@pytest.fixture(scope="module", autouse=True)
def float64():
    """The whole module in float64 (restored afterwards: other tests run in float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class FunctionalProblem:
    """A BilevelProblem over two explicit tensors (w, lam), gradients by autograd."""

    def __init__(self, inner_loss, outer_loss, w: torch.Tensor, lam: torch.Tensor, lr: float = 0.1):
        self.losses = {Objective.INNER: inner_loss, Objective.OUTER: outer_loss}
        self.w, self.lam, self.lr = w, lam, lr
        self.offset = torch.zeros_like(w)
        self.passes = 0

    def gradients(self, objective):
        self.passes += 1
        w = (self.w + self.offset).requires_grad_()
        lam = self.lam.clone().requires_grad_()
        grad_w, grad_lam = torch.autograd.grad(self.losses[objective](w, lam), [w, lam])
        return [grad_w], [grad_lam]

    def perturb_inner(self, direction, scale=0.0):
        self.offset = torch.zeros_like(self.w) if direction is None else scale * direction[0]

    def inner_learning_rate(self):
        return self.lr


def make_problem():
    g = torch.Generator().manual_seed(0)
    x_tr, x_val = torch.randn(40, N_INNER, generator=g), torch.randn(30, N_INNER, generator=g)
    truth = torch.randn(N_INNER, generator=g)
    y_tr, y_val = torch.sign(x_tr @ truth), torch.sign(x_val @ truth)
    mix = torch.randn(N_INNER, N_OUTER, generator=g) * 0.5

    def inner_loss(w, lam):
        # log cosh keeps the lam-w coupling non-quadratic, so finite differences are not exact.
        penalty = 0.5 * w.square() + torch.log(torch.cosh(w))
        return F.softplus(-y_tr * (x_tr @ w)).mean() + (torch.exp(mix @ lam) * penalty).sum()

    def outer_loss(w, lam):
        return F.softplus(-y_val * (x_val @ w)).mean() + 0.01 * lam.square().sum()

    lam = torch.randn(N_OUTER, generator=g) * 0.3 - 1.0
    w = torch.zeros(N_INNER)
    for _ in range(50):  # Newton to machine precision: the implicit-function theorem's w*(lam)
        grad = torch.autograd.functional.jacobian(lambda v: inner_loss(v, lam), w)
        w = w - torch.linalg.solve(torch.autograd.functional.hessian(lambda v: inner_loss(v, lam), w), grad)
    return inner_loss, outer_loss, w, lam


def exact_terms(inner_loss, outer_loss, w, lam):
    """(grad_lam L_val, grad_w L_val, H, J) with J = d2 L_tr / dlam dw, shape (n_outer, n_inner)."""
    grad_w_val = torch.autograd.functional.jacobian(lambda v: outer_loss(v, lam), w)
    grad_lam_val = torch.autograd.functional.jacobian(lambda m: outer_loss(w, m), lam)
    hessian = torch.autograd.functional.hessian(lambda v: inner_loss(v, lam), w)
    mixed = torch.autograd.functional.jacobian(
        lambda m: torch.autograd.functional.jacobian(lambda v: inner_loss(v, m), w, create_graph=True), lam).T
    return grad_lam_val, grad_w_val, hessian, mixed


@pytest.fixture(scope="module")
def setup(float64):
    inner_loss, outer_loss, w, lam = make_problem()
    grad_lam_val, grad_w_val, hessian, mixed = exact_terms(inner_loss, outer_loss, w, lam)
    exact = grad_lam_val - mixed @ torch.linalg.solve(hessian, grad_w_val)
    return inner_loss, outer_loss, w, lam, exact, grad_lam_val, grad_w_val, hessian, mixed


def run(method, setup, **overrides):
    inner_loss, outer_loss, w, lam = setup[:4]
    problem = FunctionalProblem(inner_loss, outer_loss, w, lam)
    h = HYPERGRADS[method](problem, BilevelConfig(hypergrad=method, **overrides))
    return h[0], problem.passes


def test_problem_has_a_real_implicit_term(setup):
    exact, grad_lam_val = setup[4], setup[5]
    assert relative_error(grad_lam_val, exact) > 0.05  # first order is visibly not exact here


def test_first_order_is_the_direct_gradient(setup):
    h, passes = run("first_order", setup)
    torch.testing.assert_close(h, setup[5], rtol=1e-12, atol=0)
    assert passes == 1


@pytest.mark.parametrize("form", ["betty", "original"])
def test_darts_matches_its_closed_form_and_tightens_with_eps(setup, form):
    grad_lam_val, grad_w_val, mixed = setup[5], setup[6], setup[8]
    xi = 1.0 if form == "betty" else 0.1  # FunctionalProblem's inner learning rate
    target = grad_lam_val - xi * mixed @ grad_w_val  # DARTS' promise: H^-1 ~ xi I
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        h, passes = run("darts", setup, hypergrad_eps=eps, darts_form=form)
        errors.append(relative_error(h, target))
        assert passes == 3
    assert errors[0] > errors[1] > errors[2]  # central differences: O(eps^2)
    assert errors[2] < 1e-7
    assert errors[0] / errors[1] > 30  # close to the promised factor 100 per decade


def test_neumann_approaches_exact_with_more_terms(setup):
    exact, hessian = setup[4], setup[7]
    alpha = 1.0 / torch.linalg.eigvalsh(hessian).max().item()  # 0 < alpha < 2 / lambda_max
    errors = []
    for terms in (1, 4, 16, 64, 256):
        h, passes = run("neumann", setup, neumann_terms=terms, neumann_alpha=alpha, hypergrad_eps=1e-4)
        errors.append(relative_error(h, exact))
        assert passes == 2 * terms + 3
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-6


def test_cg_approaches_exact_with_more_steps(setup):
    exact = setup[4]
    errors = []
    for steps in range(1, N_INNER + 1):
        h, passes = run("cg", setup, cg_steps=steps, hypergrad_eps=1e-4)
        errors.append(relative_error(h, exact))
        assert passes <= 2 * steps + 3
    # CG minimises the H-norm error of p = H^-1 v, so the hypergradient error need not fall
    # at every single step; it falls overall and vanishes once K reaches the dimension.
    assert errors[-1] < 1e-7  # n CG steps solve an n-dimensional system
    assert all(e > 100 * errors[-1] for e in errors[:-1])
    assert errors[-2] < errors[len(errors) // 2] < errors[0]


def test_methods_restore_the_inner_weights(setup):
    inner_loss, outer_loss, w, lam = setup[:4]
    for method in HYPERGRADS:
        problem = FunctionalProblem(inner_loss, outer_loss, w.clone(), lam)
        HYPERGRADS[method](problem, BilevelConfig(hypergrad=method))
        assert torch.equal(problem.offset, torch.zeros_like(w)), method
