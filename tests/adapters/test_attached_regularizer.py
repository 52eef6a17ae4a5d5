"""Regularisers attached in the layer's forward give the gradient of the explicit mean regulariser.

The engine uses the attached form (it works under ZeRO-3, where parameters exist only inside
their layer's forward and backward); ``levels.regularizer`` is the explicit definition.
"""

import pytest
import torch

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.levels import Level, level_parameters, regularizer, set_regularization


def adapted(method: str, **overrides):
    model = build_builtin_model("builtin:micro-llama", vocab_size=64, seed=0)
    torch.manual_seed(0)
    inject_adapters(model, AdapterConfig(method=method, rank=4, **overrides))
    with torch.no_grad():
        for level in Level:
            for p in level_parameters(model, level):
                p.add_(torch.randn_like(p) * 0.1)
    return model


CASES = [("bilora", {"orth_reg_weight": 0.3}, Level.INNER),
         ("bilora", {"lambda_param": "binary", "binary_reg_weight": 0.7}, Level.OUTER),
         ("bidora", {"direction_orth_weight": 0.2}, Level.INNER)]


@pytest.mark.parametrize(("method", "overrides", "level"), CASES)
@pytest.mark.parametrize("accumulation", [1, 3])
def test_attached_gradient_equals_explicit(method, overrides, level, accumulation):
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    explicit, attached = adapted(method, **overrides), adapted(method, **overrides)
    params = [*level_parameters(explicit, Level.INNER), *level_parameters(explicit, Level.OUTER)]
    (explicit(tokens).logits.float().square().mean() + regularizer(explicit, level)).backward()
    set_regularization(attached, (level,), accumulation_steps=accumulation)
    for _ in range(accumulation):  # the regulariser part accumulates to one full term
        (attached(tokens).logits.float().square().mean() / accumulation).backward()
    others = [*level_parameters(attached, Level.INNER), *level_parameters(attached, Level.OUTER)]
    for expected, got in zip(params, others, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-7)


def test_nothing_attached_without_grad_or_levels():
    model = adapted("bilora", orth_reg_weight=0.3)
    tokens = torch.randint(0, 64, (1, 6))
    set_regularization(model, (Level.INNER,))
    with torch.no_grad():
        with_levels = model(tokens).logits
    set_regularization(model, ())
    torch.testing.assert_close(model(tokens).logits, with_levels, rtol=0, atol=0)  # forward values untouched
