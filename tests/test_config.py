import pytest

from ds_bilevel.config import flat_field_types, load_config


def test_yaml_then_command_line_precedence(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: 7\nmethod: dora\nadapter:\n  rank: 4\n  alpha: 8\nlearning_rate: 1\n")
    run = load_config(["--config", str(yaml_file), "--adapter.rank", "2", "--seed", "3"])
    assert run.max_steps == 7  # from YAML
    assert run.adapter.method == "dora"  # the `method` alias in YAML
    assert run.adapter.rank == 2  # command line beats YAML
    assert run.adapter.alpha == 8.0 and run.learning_rate == 1.0  # ints coerced for float fields
    assert run.seed == 3


def test_method_alias_and_list_setting():
    run = load_config(["--method", "dora", "--adapter.target_modules", "q_proj,v_proj"])
    assert run.adapter.method == "dora"
    assert run.adapter.target_modules == ["q_proj", "v_proj"]


def test_unknown_yaml_key_lists_valid_settings(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_stepz: 7\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_stepz'\]; valid settings are .*'max_steps'"):
        load_config(["--config", str(yaml_file)])


def test_unknown_command_line_flag_is_refused():
    with pytest.raises(ValueError, match=r"unrecognized arguments: --max_stepz 3; see --help"):
        load_config(["--max_stepz", "3"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "qlora"], r"adapter.method: 'qlora' is not one of"),
    (["--adapter.rank", "0"], r"adapter.rank: 0 must be an integer >= 1"),
    (["--warmup_ratio", "1.5"], r"warmup_ratio: 1.5 must be in \[0, 1\)"),
    (["--lr_scheduler", "step"], r"lr_scheduler: 'step' is not one of"),
    (["--ds_config", "missing.json"], r"ds_config: file 'missing.json' does not exist"),
    (["--micro_batch_size", "0"], r"micro_batch_size: 0 must be an integer >= 1"),
])
def test_bad_values_name_the_setting(argv, message):
    with pytest.raises(ValueError, match=message):
        load_config(argv)


def test_wrong_type_in_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: ten\n")
    with pytest.raises(ValueError, match="max_steps: 'ten' is not a valid int"):
        load_config(["--config", str(yaml_file)])


def test_every_setting_has_a_command_line_flag():
    types = flat_field_types()
    assert {"max_steps", "seed", "output_dir", "ds_config", "adapter.method", "data.max_length"} <= set(types)


def test_every_setting_is_documented():
    from launch_helpers import REPO

    from ds_bilevel.config import settings_markdown

    usage = (REPO / "docs" / "usage.md").read_text()
    missing = [key for key in flat_field_types() if f"`{key}`" not in usage]
    assert not missing, f"settings missing from docs/usage.md: {missing}"
    assert settings_markdown() in usage, "docs/usage.md's table is stale: paste `python -m ds_bilevel.config`"


def test_every_shipped_run_config_loads():
    from launch_helpers import REPO

    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert len(shipped) >= 2
    for path in shipped:
        run = load_config(["--config", str(path)])  # validates every value, the ds_config path included
        assert run.adapter.rank == 16 and run.bilevel.hypergrad == "darts", path.name
