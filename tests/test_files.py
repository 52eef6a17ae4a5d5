"""Damaged safetensors files are refused with one line naming the setting and the file."""

import pytest
import torch
from safetensors.torch import save_file

from ds_bilevel.files import check_safetensors, check_weights_folder


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
