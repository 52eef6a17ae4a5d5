"""neumann and cg on a real BiDoRA layer converge to the exact implicit hypergradient, in the
default configuration (issue 12, item 5).

One BiDoRA layer (in 6, out 4, r 2, float64): the direction {A, B} is the inner level, fitted
on D1 with a small ridge, weighted differently per rank component (it removes the
B A = (B G)(G^-1 A) symmetry, rotations included, so that the inner Hessian is positive
definite at the inner minimum); the magnitude m is the outer level,
scored on D2. The exact implicit hypergradient at the inner minimum w*(m),

    dF/dm = grad_m L_val - (d2 L_tr / dm dw) H^-1 grad_w L_val,

comes from autograd through the DoRA formula written out here, with the true (undetached) row
norm: the inner loss is what the inner optimizer minimises. The hypergradient methods see the
layer only through its forward and autograd, as on the engine and the reference, so with
``detach_norm`` on their "inner gradient" is not the gradient of the inner loss and they miss.
"""

from __future__ import annotations

import pytest
import torch
from numerics import relative_error
from torch import nn

from ds_bilevel.adapters import AdapterConfig, BiDoraLayer
from ds_bilevel.bilevel_config import detach_norm_warning
from ds_bilevel.hypergrad import HYPERGRADS, BilevelConfig, Objective

IN, OUT, RANK, ALPHA, RIDGE = 6, 4, 2, 4.0, 2.0
N_INNER = RANK * (IN + OUT)


def dora_forward(w0, bias, a, b, m, x):
    """m * (W0 + s B A) / ||W0 + s B A||_row applied to x, the norm not detached."""
    v = w0 + (ALPHA / RANK) * b @ a
    return x @ (m.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)).T + bias


def ridge(a, b):
    weights = torch.arange(1, RANK + 1, dtype=a.dtype).unsqueeze(1)  # (r, 1): no rotation of the rank space is free
    return 0.5 * RIDGE * ((weights * a.square()).sum() + b.square().sum())


def split(w):
    return w[:RANK * IN].view(RANK, IN), w[RANK * IN:].view(OUT, RANK)


class Data:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x_tr, self.x_val = torch.randn(40, IN, generator=g), torch.randn(30, IN, generator=g)
        teacher = torch.randn(OUT, IN, generator=g)
        self.y_tr = self.x_tr @ teacher.T + 0.1 * torch.randn(40, OUT, generator=g)
        self.y_val = self.x_val @ teacher.T + 0.1 * torch.randn(30, OUT, generator=g)
        # Scaled inputs: the inner Hessian's condition number is about 9 (Neumann converges in ~150
        # terms) while the implicit term is half the hypergradient.
        self.x_tr, self.x_val = 0.7 * self.x_tr, 0.7 * self.x_val


def outer_loss(out, data):
    return (out - data.y_val).square().mean()


class LayerProblem:
    """A BilevelProblem over one BiDoRA layer: gradients by autograd through the layer's own forward."""

    def __init__(self, layer: BiDoraLayer, data: Data, lr: float = 0.1):
        self.layer, self.data, self.lr = layer, data, lr
        self.w = [layer.lora_A.detach().clone(), layer.lora_B.detach().clone()]

    def gradients(self, objective):
        layer = self.layer
        if objective is Objective.INNER:
            x, y, ridge_weight = self.data.x_tr, self.data.y_tr, 1.0
        else:
            x, y, ridge_weight = self.data.x_val, self.data.y_val, 0.0
        loss = (layer(x) - y).square().mean() + ridge_weight * ridge(layer.lora_A, layer.lora_B)
        grad_a, grad_b, grad_m = torch.autograd.grad(loss, [layer.lora_A, layer.lora_B, layer.magnitude])
        return [grad_a, grad_b], [grad_m]

    @torch.no_grad()
    def perturb_inner(self, direction, scale=0.0):
        for param, w, d in zip((self.layer.lora_A, self.layer.lora_B), self.w, direction or [None, None],
                               strict=True):
            param.copy_(w if d is None else w + scale * d)

    def inner_learning_rate(self):
        return self.lr


def solve_inner(layer: BiDoraLayer, data: Data) -> None:
    """Put the layer's direction at the exact inner minimum (L-BFGS, then Newton to machine precision)."""
    w0, bias, m = layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), layer.magnitude.detach()

    def loss(w):
        a, b = split(w)
        out = dora_forward(w0, bias, a, b, m, data.x_tr)
        return (out - data.y_tr).square().mean() + ridge(a, b)

    w = torch.cat([layer.lora_A.detach().flatten(), layer.lora_B.detach().flatten()]).requires_grad_()
    lbfgs = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = loss(w)
        value.backward()
        return value

    lbfgs.step(closure)
    w = w.detach()
    for _ in range(5):
        grad = torch.autograd.functional.jacobian(loss, w)
        w = w - torch.linalg.solve(torch.autograd.functional.hessian(loss, w), grad)
    assert torch.autograd.functional.jacobian(loss, w).norm() < 1e-12
    with torch.no_grad():
        a, b = split(w)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)


def exact_hypergradient(layer: BiDoraLayer, data: Data):
    """grad_m L_val - J H^-1 grad_w L_val at the current (inner-optimal) direction, and H."""
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    w = torch.cat([layer.lora_A.detach().flatten(), layer.lora_B.detach().flatten()])
    m = layer.magnitude.detach().clone()

    def l_tr(w_, m_):
        a, b = split(w_)
        out = dora_forward(w0, bias, a, b, m_, data.x_tr)
        return (out - data.y_tr).square().mean() + ridge(a, b)

    def l_val(w_, m_):
        a, b = split(w_)
        return outer_loss(dora_forward(w0, bias, a, b, m_, data.x_val), data)

    grad_w_val = torch.autograd.functional.jacobian(lambda v: l_val(v, m), w)
    grad_m_val = torch.autograd.functional.jacobian(lambda n: l_val(w, n), m)
    hessian = torch.autograd.functional.hessian(lambda v: l_tr(v, m), w)
    mixed = torch.autograd.functional.jacobian(
        lambda n: torch.autograd.functional.jacobian(lambda v: l_tr(v, n), w, create_graph=True), m)  # (n_w, n_m)
    return grad_m_val - mixed.T @ torch.linalg.solve(hessian, grad_w_val), grad_m_val, hessian


def make_layer(**overrides) -> BiDoraLayer:
    torch.manual_seed(0)
    layer = BiDoraLayer.from_config(nn.Linear(IN, OUT), AdapterConfig(method="bidora", rank=RANK, alpha=ALPHA,
                                                                    **overrides))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.3)
    return layer


@pytest.fixture(scope="module")
def setup(float64):
    data = Data()
    layer = make_layer()
    solve_inner(layer, data)
    exact, direct, hessian = exact_hypergradient(layer, data)
    assert ((direct - exact).norm() / exact.norm()) > 0.05  # the implicit term is not negligible here
    return data, {name: p.detach().clone() for name, p in layer.named_parameters()}, exact, hessian


def run(setup, method, **overrides):
    """The hypergradient of ``method`` on a fresh layer with the given adapter settings (the default
    configuration when none), at the inner minimum."""
    data, state, exact = setup[:3]
    layer = make_layer(**overrides)
    layer.load_state_dict(state)
    config = BilevelConfig(hypergrad=method, hypergrad_eps=1e-4, cg_steps=N_INNER, neumann_terms=150,
                           neumann_alpha=1.0 / torch.linalg.eigvalsh(setup[3]).max().item())
    return relative_error(HYPERGRADS[method](LayerProblem(layer, data), config)[0], exact)


def test_bidora_does_not_detach_the_norm_by_default():
    assert BiDoraLayer.from_config(nn.Linear(IN, OUT), AdapterConfig(method="bidora")).detach_norm is False


@pytest.mark.parametrize("method, bound", [("cg", 1e-6), ("neumann", 1e-6)])
def test_implicit_methods_converge_to_the_exact_hypergradient_by_default(setup, method, bound):
    assert run(setup, method) < bound


def test_a_detached_norm_misses_the_implicit_hypergradient(setup):
    """Why the default is not DoRA's: with detach_norm the inner "gradient" is not the gradient of
    the inner loss, so H and J are the wrong operators (measured: cg 213% off on such a problem)."""
    assert run(setup, "cg", detach_norm=True) > 0.1


def test_detach_norm_warning_names_the_implicit_methods_only():
    assert "cg" in detach_norm_warning("bidora", True, "cg")
    assert detach_norm_warning("bidora", True, "neumann")
    assert detach_norm_warning("bidora", False, "cg") is None
    assert detach_norm_warning("bidora", True, "darts") is None
    assert detach_norm_warning("dora", True, "cg") is None


def test_a_detached_norm_under_an_implicit_hypergradient_is_warned_before_launch(capsys):
    """Allowed as an explicit choice, but said once: check_run prints the one-line warning."""
    from ds_bilevel.config import config_from_flat
    from ds_bilevel.validation import check_run

    settings = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 32, "data.eval_size": 8,
                "adapter.method": "bidora", "bilevel.hypergrad": "cg", "micro_batch_size": 2}
    check_run(config_from_flat({**settings, "adapter.detach_norm": True}), 1)
    assert capsys.readouterr().err.count("warning: adapter.detach_norm: true with bilevel.hypergrad cg") == 1
    check_run(config_from_flat(settings), 1)
    assert capsys.readouterr().err == ""
