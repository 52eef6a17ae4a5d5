"""Damaged safetensors files are refused with one line naming the setting and the file."""

import pytest
import torch
from safetensors.torch import save_file

from ds_bilevel.integrity import check_safetensors, check_weights_folder


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 32), "b": torch.randn(7)}, str(path))
    return path


def test_an_intact_file_passes(weights):
    check_safetensors(weights, "model_name_or_path")
    assert check_weights_folder(weights.parent, "model_name_or_path") == [weights]


@pytest.mark.parametrize(("keep", "message"), [
    (5, "is truncated (5 bytes; a safetensors file starts with an 8-byte header length)"),
    (40, "is truncated or not safetensors (40 bytes"),
    (-100, "is truncated or damaged ("),
])
def test_a_truncated_file_is_refused(weights, keep, message):
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(ValueError) as error:
        check_safetensors(weights, "model_name_or_path")
    assert str(error.value).startswith(f"model_name_or_path: {weights} {message}")
    assert "\n" not in str(error.value)
    # safetensors itself refuses it too, in its own words: the check must agree
    from safetensors import safe_open

    with pytest.raises(Exception), safe_open(str(weights), "pt") as handle:  # noqa: B017 (SafetensorError)
        [handle.get_tensor(k) for k in handle.keys()]  # noqa: SIM118 (safe_open is not a dict)


def test_a_corrupt_header_and_pickled_weights_are_refused(weights, tmp_path):
    data = bytearray(weights.read_bytes())
    data[10:20] = b"\xff" * 10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has a corrupt safetensors header"):
        check_safetensors(weights, "checkpoint_dir")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"a": torch.ones(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds pickled weights"):
        check_weights_folder(pickled, "model_name_or_path")


def assert_refused(script: str, args: list[str], out, expected_line: str) -> None:
    """launch/<script> exits 2 with exactly ``expected_line``'s start on stderr and writes no ``out``."""
    import subprocess
    import sys

    from launch_helpers import REPO, cpu_env

    result = subprocess.run([sys.executable, str(REPO / "launch" / script), *args, "--output_dir", str(out)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected_line), result.stderr
    assert not out.exists()


def truncate(path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def test_truncated_model_weights_stop_training_before_launch(tmp_path):
    from ds_bilevel.builtin.model import build_builtin_model
    from ds_bilevel.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:micro-llama")
    folder = tmp_path / "model"
    build_builtin_model("builtin:micro-llama", len(tokenizer), seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    truncate(folder / "model.safetensors")
    assert_refused("train.py", ["--model_name_or_path", str(folder)], tmp_path / "out",
                   f"error: model_name_or_path: {folder / 'model.safetensors'} is truncated or damaged")


def test_truncated_adapters_stop_the_export(tmp_path):
    import json

    from ds_bilevel.config import RunConfig, config_to_dict

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(config_to_dict(RunConfig())))
    save_file({"x": torch.randn(256)}, str(run / "adapter_model.safetensors"), metadata={"method": "lora"})
    truncate(run / "adapter_model.safetensors")
    assert_refused("export.py", ["--checkpoint_dir", str(run)], tmp_path / "export",
                   f"error: checkpoint_dir: {run / 'adapter_model.safetensors'} is truncated or damaged")
