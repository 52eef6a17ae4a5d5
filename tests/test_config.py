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
    with pytest.raises(ValueError, match=r"unrecognized arguments: --max_stepz 3 \(did you mean --max_steps\?\); see"):
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


@pytest.mark.parametrize("method", ["lora", "dora", "bilora", "bidora", "bilora_sam"])
def test_retrain_steps_follow_the_registry(method):
    """bilevel.retrain_steps is read where the method's registry entry says retraining applies, and
    refused, naming those methods, elsewhere."""
    from ds_bilevel.adapters.registry import METHODS

    argv = ["--method", method, "--bilevel.retrain_steps", "2"]
    if METHODS[method].retraining:
        assert load_config(argv).bilevel.retrain_steps == 2
    else:
        with pytest.raises(ValueError, match=r"bilevel.retrain_steps: 2 needs a bi-level adapter.method "
                                             r"\(bidora, bilora\), not "):
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


# ---- the command line explains itself (issue 18) ------------------------------------------------
def _collapsed(text: str) -> str:
    return " ".join(text.split())


def test_help_shows_every_setting_with_its_description_default_and_allowed_values():
    from ds_bilevel.config import RunConfig, build_parser, field_docs, section_class, settings

    help_text = _collapsed(build_parser().format_help())
    sections = {"": RunConfig, **{name: section_class(name) for name in ("adapter", "data", "bilevel")}}
    for setting in settings():
        section, _, leaf = setting.key.rpartition(".")
        doc = field_docs(sections[section])[leaf]  # the docstring, read by inspect from the imported class
        assert f"--{setting.key} " in help_text, setting.key
        assert f"{_collapsed(doc)} [default: " in help_text, setting.key
    for expected in ("--max_steps MAX_STEPS Inner optimizer steps", "[default: 300; allowed: an integer >= 1]",
                     "--adapter.method {lora,dora,bilora,bidora,bilora_sam}, --method",
                     "[default: lora; allowed: lora, dora, bilora, bidora, bilora_sam]",
                     "[default: 0.1; allowed: a number in [0, 1)]", "[default: true; allowed: true, false]",
                     "[default: all-linear; allowed: a comma-separated list]", "[default: unset; allowed: true, false]",
                     "[default: darts; allowed: first_order, darts, neumann, cg]"):
        assert expected in help_text, expected


def test_settings_read_from_source_are_the_dataclasses():
    """--help reads the settings from the source files (no torch import): the same names, types,
    defaults and choices as the imported dataclasses."""
    import importlib

    from ds_bilevel import adapters, data
    from ds_bilevel import bilevel_config as hypergrad_config
    from ds_bilevel.config import LR_SCHEDULERS, RunConfig, config_to_dict, settings

    try:
        methods = importlib.import_module("ds_bilevel.adapters.registry").METHODS
    except ModuleNotFoundError:  # before the method registry
        methods = adapters.METHODS

    types = flat_field_types()
    listed = settings()
    assert [s.key for s in listed] == list(types)
    assert {s.key: s.type for s in listed} == {k: getattr(t, "__name__", str(t)) if t != list[str] else "list[str]"
                                               for k, t in types.items()}
    flat_defaults = {}
    for key, value in config_to_dict(RunConfig()).items():
        if isinstance(value, dict):
            flat_defaults.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat_defaults[key] = value
    assert {s.key: s.default for s in listed} == flat_defaults
    assert {s.key: s.choices for s in listed if s.choices} == {
        "lr_scheduler": LR_SCHEDULERS, "adapter.method": tuple(methods),
        "adapter.lambda_param": adapters.config.LAMBDA_PARAMS, "data.format": data.FORMATS,
        "bilevel.hypergrad": hypergrad_config.HYPERGRAD_METHODS, "bilevel.darts_form": hypergrad_config.DARTS_FORMS}


def test_help_answers_without_importing_torch_deepspeed_or_transformers():
    """`python launch/train.py --help` lists every flag without importing torch, deepspeed or
    transformers (-X importtime lists each module a process imports): it answers in about a second."""
    import subprocess
    import sys

    from launch_helpers import REPO, cpu_env

    from ds_bilevel.config import settings

    def imported(command: list[str]) -> tuple[str, set[str]]:
        result = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=REPO, env=cpu_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        modules = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                   if line.startswith("import time:")}
        return result.stdout, modules

    stdout, modules = imported(["launch/train.py", "--help"])
    assert all(f"--{s.key} " in stdout for s in settings())
    assert not {"torch", "deepspeed", "transformers", "datasets", "mpi4py"} & modules
    _, modules = imported(["-c", "from ds_bilevel.config import build_parser; build_parser().parse_args(['--help'])"])
    assert "ds_bilevel" in modules and not {"torch", "deepspeed", "transformers", "yaml"} & modules


@pytest.mark.parametrize(("argv", "closest"), [
    (["--lr", "0.1"], "--learning_rate"),  # was taken as --lr_scheduler (prefix matching)
    (["--max_step", "3"], "--max_steps"),  # was taken silently as --max_steps
    (["--max_stepz", "3"], "--max_steps"),
    (["--rank", "4"], "--adapter.rank"),
    (["--method", "dora", "--learning_rat=0.1"], "--learning_rate"),
    (["--adapter.lambda", "real"], "--adapter.lambda_param"),
])
def test_abbreviations_are_refused_naming_the_closest_flag(argv, closest):
    with pytest.raises(ValueError) as error:
        load_config(argv)
    message = str(error.value)
    assert message.startswith(f"unrecognized arguments: {' '.join(a for a in argv if a not in ('--method', 'dora'))}")
    assert f" (did you mean {closest}?); see --help" in message and "\n" not in message


def test_train_py_refuses_an_unknown_flag_in_one_line(capsys):
    import importlib.util

    from launch_helpers import REPO

    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main(["--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: unrecognized arguments: --lr 0.1 (did you mean --learning_rate?); "
                   "see --help for the settings\n")
