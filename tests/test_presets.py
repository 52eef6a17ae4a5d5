"""--preset: each shipped preset loads and holds exactly the values of its table in docs/methods.md
("Presets"), a flag or --config overrides it, an unknown name is refused in one line."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from launch_helpers import REPO

from ds_bilevel.config import config_from_flat, load_config, preset_names, read_preset
from ds_bilevel.ds_config import fill_ds_config, settings_from_ds_config

PRESETS = ("bidora_paper", "bilora_paper", "bilora_sam_paper")
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|")


def table(name: str) -> dict:
    """{setting: value} of the rows of preset ``name``'s table whose setting and value are in backticks."""
    text = (REPO / "docs" / "methods.md").read_text()
    section = text[text.index(f"### `{name}`"):]
    section = section[:section.find("\n### ", 1)] if "\n### " in section[1:] else section
    rows = {}
    for line in section.splitlines():
        if (match := ROW.match(line)) is not None:
            key = {"method": "adapter.method", "hypergrad": "bilevel.hypergrad", "unroll_steps": "bilevel.unroll_steps",
                   "split_ratio": "bilevel.split_ratio"}.get(match[1], match[1])
            rows[key] = yaml.safe_load(match[2])
    return rows


def test_the_shipped_presets_are_the_documented_ones():
    assert tuple(preset_names()) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_holds_its_table(name):
    documented, shipped = table(name), read_preset(name)
    assert documented and set(documented) == set(shipped), set(documented) ^ set(shipped)
    expected = config_from_flat(documented)
    loaded = load_config(["--preset", name])
    for key in documented:
        section, _, leaf = key.rpartition(".")
        got = getattr(getattr(loaded, section) if section else loaded, leaf)
        want = getattr(getattr(expected, section) if section else expected, leaf)
        assert got == want, (name, key, got, want)
        assert loaded.sources[key] == f"the preset {name}"


def test_a_preset_runs_on_the_default_model():
    """The targets fit the default builtin LLaMA model (validation's check, without a launch)."""
    from ds_bilevel.adapters.inject import target_layer_names
    from ds_bilevel.builtin.model import build_builtin_model

    for name in PRESETS:
        run = load_config(["--preset", name])
        assert target_layer_names(build_builtin_model(run.model_name_or_path, 64), run.adapter), name


def test_flags_and_config_override_a_preset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-3\nadapter:\n  rank: 16\n")
    run = load_config(["--preset", "bidora_paper", "--config", str(config), "--adapter.rank", "2"])
    assert run.adapter.rank == 2 and run.sources["adapter.rank"] == "the command line"
    assert run.learning_rate == 1e-3 and run.sources["learning_rate"] == f"the config file {config}"
    assert run.adam_beta2 == 0.98 and run.sources["adam_beta2"] == "the preset bidora_paper"


def test_a_preset_overrides_the_deepspeed_json(tmp_path):
    ds = {"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto"}
    run = settings_from_ds_config(ds, load_config(["--preset", "bidora_paper"]), 1)
    assert run.max_grad_norm == 0.0
    assert fill_ds_config(ds, run, 1)["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="disagrees"):  # a flag against the JSON is still a conflict
        settings_from_ds_config(ds, load_config(["--max_grad_norm", "0.5"]), 1)
    assert json.dumps(ds)  # the caller's dict is untouched


def test_an_unknown_preset_is_refused_in_one_line():
    with pytest.raises(ValueError) as error:
        load_config(["--preset", "bidora"])
    assert "\n" not in str(error.value)
    assert str(error.value) == f"preset: 'bidora' is not one of {list(PRESETS)}"
