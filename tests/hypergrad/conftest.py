"""Fixtures of the hypergradient tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
