"""Issue 14's per-level settings: AdamW betas and eps (adam_beta1, adam_beta2, adam_epsilon), BiDoRA's
retraining learning rate, weight decay and warm-up (bilevel.retrain_*), and the outer level's own
gradient clipping (bilevel.outer_max_grad_norm). Each reaches the optimizer or DeepSpeed, and the
engine still ends where the plain-PyTorch reference ends with it set (tests/scripts/level_settings.py,
ZeRO-0, 2 and 3)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from launch_helpers import REPO, run_script
from safetensors.torch import load_file

from ds_bilevel.config import build_parser, config_from_flat
from ds_bilevel.levels import Level
from ds_bilevel.optim import level_max_grad_norm, retraining_settings
from ds_bilevel.preparation import prepare
from ds_bilevel.reference import ReferenceBilevel, run_reference

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from level_settings import ADAM, CASES, CLIP, GLOBAL_BATCH, RETRAIN, SHARED, settings  # noqa: E402

NEW = ("adam_beta1", "adam_beta2", "adam_epsilon", "bilevel.outer_max_grad_norm", "bilevel.retrain_learning_rate",
       "bilevel.retrain_weight_decay", "bilevel.retrain_warmup_ratio")


def test_defaults_keep_the_old_behaviour():
    run = config_from_flat({})
    assert (run.adam_beta1, run.adam_beta2, run.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert level_max_grad_norm(run, (Level.OUTER,)) == level_max_grad_norm(run, (Level.INNER,)) == 1.0
    assert retraining_settings(run) == (run.learning_rate, run.weight_decay, run.warmup_ratio)


def test_sentinels_and_explicit_values():
    run = config_from_flat({"adapter.method": "bidora", "max_grad_norm": 0.5, "bilevel.outer_max_grad_norm": 0.0,
                            "learning_rate": 1e-3,
                            "weight_decay": 0.1, **{k: v for k, v in RETRAIN.items() if k != "weight_decay"}})
    assert level_max_grad_norm(run, (Level.OUTER,)) == 0.0  # off: Betty's default
    assert level_max_grad_norm(run, (Level.INNER,)) == 0.5
    assert level_max_grad_norm(run, (Level.INNER, Level.OUTER)) == 0.5  # Bi-LoRA's joint step
    assert retraining_settings(run) == (1e-2, 0.2, 0.5)


@pytest.mark.parametrize(("key", "value"), [
    ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_epsilon", 0.0), ("bilevel.outer_max_grad_norm", -0.5),
    ("bilevel.retrain_learning_rate", -1.0), ("bilevel.retrain_weight_decay", -2.0),
    ("bilevel.retrain_warmup_ratio", 1.0)])
def test_bad_values_are_refused_naming_the_setting(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_flat({key: value})


def test_each_new_setting_is_a_documented_flag():
    text = " ".join(build_parser().format_help().split())
    for key in NEW:
        assert f"--{key}" in text, key
    assert "the same as max_grad_norm" in text and "released BiDoRA code" in text


def test_the_reference_optimizer_takes_the_betas_and_eps():
    run = config_from_flat({**SHARED, **ADAM, "micro_batch_size": GLOBAL_BATCH})
    reference = ReferenceBilevel(prepare(run).model, run)
    for group in reference.optimizer.param_groups:
        assert group["betas"] == (0.8, 0.98) and group["eps"] == 1e-6


# ---- through DeepSpeed, against the reference --------------------------------------------------
def rel_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    a = torch.cat([got[n].flatten() for n in expected])
    b = torch.cat([expected[n].flatten() for n in expected])
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("level_settings")
    run_script("level_settings.py", out, 1)
    return out, json.loads((out / "records.json").read_text())


@pytest.mark.launcher
def test_settings_reach_the_optimizer_and_deepspeed(engine_runs):
    _, records = engine_runs
    expected_type = {0: "LevelAdamW", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
    for name, record in records.items():
        assert record["type"] == expected_type[CASES[name][1]], name
        # The clip DeepSpeed applies: the inner level's (max_grad_norm) on inner and retraining steps,
        # the outer level's own on outer steps.
        for step in record["steps"]:
            assert step["clip"] == (CLIP["bilevel.outer_max_grad_norm"] if step["kind"] == "outer"
                                    else CLIP["max_grad_norm"]), (name, step)
            for group in step["groups"].values():
                if name.startswith("all"):
                    assert group["betas"] == [0.8, 0.98] and group["eps"] == 1e-6, (name, group)
    record = records["all-zero2"]
    kinds = [s["kind"] for s in record["steps"]]
    assert kinds.count("retrain") == 2
    # At the start of retraining: the retraining weight decay, and the warm-up (int(0.5 * 2) = 1
    # step) puts the first step at half the retraining learning rate; the outer level is untouched.
    start = record["retraining_start"]
    assert start["inner"]["weight_decay"] == 0.2
    assert start["inner"]["lr"] == pytest.approx(0.5 * 1e-2)
    assert start["outer"]["weight_decay"] == 0.0
    first_retrain = record["steps"][kinds.index("retrain")]["groups"]["inner"]
    assert first_retrain["lr"] == pytest.approx(1e-2)  # after the warm-up step: the peak
    assert record["steps"][kinds.index("retrain") - 1]["groups"]["inner"]["weight_decay"] == 0.01


@pytest.mark.launcher
def test_engine_matches_the_reference_with_the_settings_set(engine_runs):
    """Each case ends where the one-process reference ends (10x its fp32 noise floor, as
    tests/test_engine.py), and far (100x that) from the reference at the new settings' defaults
    (the outer level clipped like the inner one), so the comparison sees them."""
    out, _ = engine_runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    errors = {}
    try:
        for name in CASES:
            run = config_from_flat({**settings(name), "micro_batch_size": 1})
            expected = run_reference(run, GLOBAL_BATCH)
            floor = rel_diff(run_reference(run, GLOBAL_BATCH, micro_batch=1), expected)
            tolerance = max(10 * floor, 1e-6)
            got = load_file(out / f"{name}.safetensors")
            assert set(got) == set(expected), name
            # all: every new setting at its default; clip: only the outer level's clip (it then clips at
            # max_grad_norm, the old behaviour)
            dropped = (*NEW, *RETRAIN) if name.startswith("all") else ("bilevel.outer_max_grad_norm",)
            defaults = {k: v for k, v in settings(name).items() if k not in dropped}
            default_run = run_reference(config_from_flat({**defaults, "micro_batch_size": 1}), GLOBAL_BATCH)
            errors[name] = (rel_diff(got, expected), tolerance, rel_diff(got, default_run))
    finally:
        torch.set_num_threads(threads)
    print(errors)
    for name, (error, tolerance, from_defaults) in errors.items():
        assert error < tolerance, (name, error, tolerance)
        assert from_defaults > 100 * tolerance, (name, from_defaults, tolerance)
