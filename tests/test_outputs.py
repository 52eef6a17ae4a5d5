"""What summary.json says of how far each level moved (ds_bilevel/outputs.py), in closed form."""

from __future__ import annotations

import math

import torch

from ds_bilevel.outputs import change_norm, relative_change


def test_relative_change_is_over_the_starting_norm():
    before = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    after = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])}
    assert math.isclose(relative_change(before, after), 1.0 / 5.0, rel_tol=1e-6)
    assert math.isclose(change_norm(before, after), 1.0, rel_tol=1e-6)


def test_a_level_that_starts_at_zero_reports_a_bounded_change():
    """BiLoRA's outer level starts at zero: the old ratio divided by a 1e-12 floor (2.3e11 in a
    real summary); now 1.0 when it moved, 0.0 when it did not, and the absolute norm besides."""
    zero = {"lam": torch.zeros(4)}
    moved = {"lam": torch.tensor([0.0, 3e-3, 4e-3, 0.0])}
    assert relative_change(zero, moved) == 1.0
    assert math.isclose(change_norm(zero, moved), 5e-3, rel_tol=1e-6)
    assert relative_change(zero, zero) == 0.0 and change_norm(zero, zero) == 0.0
    assert relative_change({}, {}) == 0.0
