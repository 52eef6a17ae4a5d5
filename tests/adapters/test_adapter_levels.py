"""Every method declares two disjoint levels that cover exactly the trainable parameters,
and gradients (of the loss and of each level's regulariser) reach exactly what each owns."""

from __future__ import annotations

import pytest
import torch

from ds_bilevel.levels import Level, adapter_layers, level_parameters, named_level_parameters, regularizer

EXPECTED_NAMES = {
    "lora": ({"lora_A", "lora_B"}, set()),
    "dora": ({"lora_A", "lora_B", "magnitude"}, set()),
    "bilora": ({"lora_P", "lora_Q"}, {"lambda_raw"}),
    "bidora": ({"lora_A", "lora_B"}, {"magnitude"}),
    "bilora_sam": ({"lora_A", "lora_B"}, {"aux_A", "aux_B"}),
}
# Settings that switch every regulariser on, so that each one is exercised.
ALL_REGULARISERS = {"direction_orth_weight": 1e-2, "orth_reg_weight": 0.1}


def base_parameters(model) -> list[torch.nn.Parameter]:
    adapter_ids = {id(p) for level in Level for p in level_parameters(model, level)}
    return [p for p in model.parameters() if id(p) not in adapter_ids]


def test_levels_are_disjoint_cover_the_trainable_set_and_hold_no_base_weight(method, adapted_llama):
    model, _ = adapted_llama(method)
    inner = {id(p) for p in level_parameters(model, Level.INNER)}
    outer = {id(p) for p in level_parameters(model, Level.OUTER)}
    assert inner and not inner & outer
    assert inner | outer == {id(p) for p in model.parameters() if p.requires_grad}
    for _, layer in adapter_layers(model):
        assert not {id(p) for p in layer.base_layer.parameters()} & (inner | outer)
        local = [{n for n, _ in layer.level_parameters(level)} for level in (Level.INNER, Level.OUTER)]
        assert tuple(local) == EXPECTED_NAMES[method]
    assert all(not p.requires_grad for p in base_parameters(model))
    # Names are qualified, unique and point at the same tensors.
    named = dict(named_level_parameters(model, Level.INNER) + named_level_parameters(model, Level.OUTER))
    assert len(named) == len(inner | outer)
    assert all(model.get_parameter(n) is p for n, p in named.items())


def test_loss_gradient_reaches_every_adapter_parameter_and_no_base_parameter(
        method, adapted_llama, randomize, tokens):
    model, _ = adapted_llama(method, **ALL_REGULARISERS)
    randomize(model)
    loss = model(tokens, labels=tokens).loss
    for level in Level:
        if (reg := regularizer(model, level)) is not None:
            loss = loss + reg
    loss.backward()
    for level in Level:
        for name, p in named_level_parameters(model, level):
            assert p.grad is not None and p.grad.abs().max() > 0, name
    assert all(p.grad is None for p in base_parameters(model))


def _expects_regulariser(method: str, level: Level, lambda_param: str) -> bool:
    if level is Level.INNER:
        return method in ("bilora", "bidora")
    return method == "bilora" and lambda_param == "binary"


@pytest.mark.parametrize("lambda_param", ["softmax", "binary"])
@pytest.mark.parametrize("level", list(Level))
def test_regulariser_gradient_reaches_only_its_own_level(method, level, lambda_param, adapted_llama,
                                                          randomize):
    model, _ = adapted_llama(method, lambda_param=lambda_param, **ALL_REGULARISERS)
    randomize(model)
    reg = regularizer(model, level)
    if not _expects_regulariser(method, level, lambda_param):
        assert reg is None
        return
    assert reg.ndim == 0 and reg > 0
    reg.backward()
    for name, p in named_level_parameters(model, level):
        assert p.grad is not None and p.grad.abs().max() > 0, name
    other = Level.OUTER if level is Level.INNER else Level.INNER
    assert all(p.grad is None for p in level_parameters(model, other))
    assert all(p.grad is None for p in base_parameters(model))


def test_regulariser_is_the_mean_over_layers(adapted_llama, randomize):
    """levels.regularizer averages the layers' weighted terms (AdaLoRA's and BiDoRA's convention)."""
    model, config = adapted_llama("bilora", orth_reg_weight=0.3)
    randomize(model)
    terms = [layer.orthogonality() for _, layer in adapter_layers(model)]
    expected = 0.3 * torch.stack(terms).mean()
    torch.testing.assert_close(regularizer(model, Level.INNER), expected, rtol=1e-6, atol=0)


def test_zero_weights_switch_regularisers_off(adapted_llama):
    for method, fields in [("bilora", {"orth_reg_weight": 0.0, "lambda_param": "binary",
                                       "binary_reg_weight": 0.0}),
                           ("bidora", {"direction_orth_weight": 0.0})]:
        model, _ = adapted_llama(method, **fields)
        assert regularizer(model, Level.INNER) is None and regularizer(model, Level.OUTER) is None
