"""BiDoRA's retraining phase on the plain-PyTorch reference (the engine is compared with the
reference at every ZeRO stage by test_engine's invariance case "bidora-retrain")."""

import dataclasses

import torch

from ds_bilevel.config import config_from_flat
from ds_bilevel.levels import Level, named_level_parameters
from ds_bilevel.preparation import batch_sources, prepare
from ds_bilevel.reference import ReferenceBilevel, run_reference
from ds_bilevel.schedule import events

SETTINGS = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 48, "data.eval_size": 8,
            "max_steps": 3, "learning_rate": 5e-3, "warmup_ratio": 0.5, "adapter.rank": 4,
            "adapter.method": "bidora", "bilevel.hypergrad": "first_order", "micro_batch_size": 1}
GLOBAL_BATCH = 8


def names(level: Level, model: torch.nn.Module) -> list[str]:
    """The level's parameter names, by the levels API (never by matching names)."""
    return [name for name, _ in named_level_parameters(model, level)]


def test_retraining_freezes_the_magnitude_and_restarts_the_direction():
    searched = run_reference(config_from_flat(SETTINGS), GLOBAL_BATCH)
    retrained = run_reference(config_from_flat({**SETTINGS, "bilevel.retrain_steps": 4}), GLOBAL_BATCH)

    # The direction equals a fresh one-level training (new AdamW, new schedule over 4 steps) that
    # starts from the initial direction with the searched magnitude, on D1 + D2.
    run = config_from_flat({**SETTINGS, "micro_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": 1,
                            "max_steps": 4})
    data = prepare(run)
    assert names(Level.OUTER, data.model) and set(searched) == set(names(Level.OUTER, data.model)) | set(
        names(Level.INNER, data.model))
    for name in names(Level.OUTER, data.model):  # the magnitude is where the bi-level phase left it
        assert torch.equal(retrained[name], searched[name]), name
    with torch.no_grad():
        for name, param in named_level_parameters(data.model, Level.OUTER):
            param.copy_(searched[name])
    fresh = ReferenceBilevel(data.model, run)
    source = batch_sources(run, "bilevel", data, 0, 1)["retrain"]
    assert len(source.indices) == 48  # all the training data: D1 and D2
    for index in range(4):
        fresh.inner_step(source.batch(index))
    expected = {n: p for level in Level for n, p in named_level_parameters(data.model, level)}
    for name in names(Level.INNER, data.model):
        assert torch.allclose(retrained[name], expected[name], rtol=1e-6, atol=1e-8), name
        assert not torch.allclose(retrained[name], searched[name])


def test_the_schedule_appends_the_retraining_steps():
    assert list(events("bilevel", 2, 1, 1, retrain_steps=2)) == [
        ("inner", 0), ("outer", 0), ("inner", 1), ("outer", 1), ("retrain", 0), ("retrain", 1)]
    assert list(events("one_level", 2, retrain_steps=2)) == [("inner", 0), ("inner", 1)]
    assert dataclasses.fields(config_from_flat(SETTINGS).bilevel)  # the setting exists
