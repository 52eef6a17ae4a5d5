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


def test_trim_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    """A resume from step 4 drops the lines a stopped launch wrote after it, and a torn last line
    (issue 18: the step-80 lines were written twice)."""
    import json

    from ds_bilevel.outputs import trim_metrics

    path = tmp_path / "metrics.jsonl"
    assert trim_metrics(path, 4) == 0 and not path.exists()
    rows = [{"step": 0, "eval_loss": 6.0}, *({"step": s, "train_loss": 1.0 / s} for s in range(1, 7)),
            {"step": 4, "eval_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train_')
    assert trim_metrics(path, 4) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]
    assert trim_metrics(path, 4) == 0  # nothing past step 4 left
    # resumed at the run's end (step 4 its last): the final evaluation's row goes, the train rows stay
    assert trim_metrics(path, 4, at_the_end=True) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4][:-1]
