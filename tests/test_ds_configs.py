"""Every shipped DeepSpeed config loads, fills and keeps DeepSpeed's batch invariant."""

import json
from pathlib import Path

import pytest

from ds_bilevel.config import RunConfig
from ds_bilevel.ds_config import fill_ds_config, read_ds_config, zero_stage

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
    assert filled["bf16"]["enabled"] is True  # bf16 by default in every shipped config
    assert zero_stage(filled) in (2, 3)


def test_concrete_value_must_agree(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto"}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 4 disagrees with the run's value 8"):
        fill_ds_config(config, RunConfig(micro_batch_size=8), world_size=2)


def test_optimizer_section_is_refused():
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        fill_ds_config({"optimizer": {"type": "AdamW"}}, RunConfig(), world_size=1)


def test_invalid_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="ds_config: .*bad.json is not valid JSON"):
        read_ds_config(bad)
