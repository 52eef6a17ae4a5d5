"""Every shipped DeepSpeed config loads, fills and keeps DeepSpeed's batch invariant."""

import json
import re
from pathlib import Path

import pytest

from ds_bilevel.config import RunConfig
from ds_bilevel.ds_config import fill_ds_config, read_ds_config, settings_from_ds_config, zero_stage

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"cpu_zero2.json", "zero2_bf16.json", "zero3_bf16.json", "zero3_offload.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_shipped_config_fills_consistently(path, world_size):
    run = RunConfig(micro_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.5)
    filled = fill_ds_config(read_ds_config(path), run, world_size)
    assert filled["train_batch_size"] == (filled["train_micro_batch_size_per_gpu"]
                                          * filled["gradient_accumulation_steps"] * world_size)
    assert filled["train_batch_size"] == 3 * 5 * world_size
    assert filled["gradient_clipping"] == 0.5
    assert "auto" not in json.dumps(filled)
    # bf16 in every GPU config; the CPU ones compute in fp32 (most CPUs emulate bf16 matrix products)
    assert filled["bf16"]["enabled"] is (not path.name.startswith("cpu_"))
    assert zero_stage(filled) in (2, 3)


def test_concrete_value_must_agree(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto"}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 4 disagrees with the run's micro_batch_size"
                                         " = 8"):
        fill_ds_config(config, RunConfig(micro_batch_size=8), world_size=2)


@pytest.mark.parametrize(("section", "flags"), [
    ("optimizer", "--learning_rate, --weight_decay"),
    ("scheduler", "--lr_scheduler (linear, cosine, constant), --warmup_ratio"),
])
def test_optimizer_and_scheduler_sections_are_refused_naming_the_flags(section, flags):
    with pytest.raises(ValueError, match=rf"the '{section}' section is not supported \(.*\); remove it and set "
                                         rf"{re.escape(flags)}"):
        fill_ds_config({section: {"type": "AdamW"}}, RunConfig(), world_size=1)


def test_a_run_built_in_code_takes_no_json_value():
    """Without a record of which settings were given (a RunConfig built in code), every setting counts
    as given: a concrete JSON value must agree with it (the launcher's runs take the JSON's values)."""
    with pytest.raises(ValueError, match="gradient_clipping = 0.5 in .* disagrees with max_grad_norm = 1.0"):
        settings_from_ds_config({"gradient_clipping": 0.5}, RunConfig(), world_size=1)


def test_invalid_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds_config: .*bad.json is not valid JSON"):
        read_ds_config(bad)
