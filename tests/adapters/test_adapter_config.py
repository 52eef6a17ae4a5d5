"""AdapterConfig: the registry, the defaults, and errors naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from torch import nn

from ds_bilevel.adapters import METHODS, AdapterConfig


def test_registry_holds_the_five_methods_each_buildable_from_config():
    assert sorted(METHODS) == ["bidora", "bilora", "bilora_sam", "dora", "lora"]
    for name, method in METHODS.items():
        cls = method.layer
        layer = cls.from_config(nn.Linear(16, 12), AdapterConfig(method=name, rank=2, aux_rank=2))
        assert isinstance(layer, cls) and layer.scaling == 8.0


def test_defaults_validate_and_every_field_is_documented():
    AdapterConfig().validate()
    config = AdapterConfig()
    defaults = (config.lambda_param, config.aux_rank, config.rho, config.direction_orth_weight)
    assert defaults == ("softmax", 8, 0.05, 0.0)
    source = inspect.getsource(AdapterConfig)
    for field in dataclasses.fields(AdapterConfig):
        # A docstring right under each field, as in litgpt's argument classes.
        after = source.split(f"    {field.name}: ", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), field.name


@pytest.mark.parametrize("field, value, allowed", [
    ("method", "qlora", r"not one of \['bidora', 'bilora', 'bilora_sam', 'dora', 'lora'\]"),
    ("lambda_param", "sparse", r"not one of \['real', 'softmax', 'binary'\]"),
    ("orth_reg_weight", -0.1, r"must be a finite number >= 0"),
    ("binary_reg_weight", float("nan"), r"must be a finite number >= 0"),
    ("direction_orth_weight", "1e-5", r"must be a finite number >= 0"),
    ("aux_rank", 0, r"must be an integer >= 1"),
    ("aux_rank", 2.5, r"must be an integer >= 1"),
    ("rho", 0.0, r"must be a finite number > 0"),
    ("rho", float("inf"), r"must be a finite number > 0"),
])
def test_bad_values_name_field_value_and_what_is_allowed(field, value, allowed):
    config = dataclasses.replace(AdapterConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"^adapter\.{field}: {re.escape(repr(value))} .*{allowed}"):
        config.validate()
