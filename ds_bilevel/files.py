"""Checks of weight files that come from outside the run, before anything reads them.

Weights are read and written as safetensors only (no pickle: loading one cannot run code).
safetensors' own reader fails on a damaged file with a message about its buffers
("MetadataIncompleteBuffer"); these checks name the setting and the file instead, and cost
one header read per file.
"""

from __future__ import annotations

import json
from pathlib import Path


def check_safetensors(path: Path, setting: str) -> None:
    """Refuse a truncated or corrupt safetensors file: ValueError('<setting>: <file> ...')."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{setting}: {path} is truncated ({size} bytes; a safetensors file starts with an "
                             f"8-byte header length)")
        header_length = int.from_bytes(prefix, "little")
        if 8 + header_length > size:
            raise ValueError(f"{setting}: {path} is truncated or not safetensors ({size} bytes, its first 8 bytes "
                             f"announce a {header_length}-byte header)")
        try:
            header = json.loads(handle.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{setting}: {path} has a corrupt safetensors header ({error})") from None
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        raise ValueError(f"{setting}: {path} is truncated or damaged ({size} bytes, its header describes "
                         f"{expected}); copy or export it again")


def check_weights_folder(folder: Path, setting: str) -> list[Path]:
    """Every *.safetensors file of a model folder, checked; a folder holding pickled weights only
    (pytorch_model.bin) is refused."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files and (any(folder.glob("*.bin")) or any(folder.glob("*.pt"))):
        raise ValueError(f"{setting}: {folder} holds pickled weights (.bin/.pt) only; ds_bilevel reads "
                         f"safetensors (convert with transformers: model.save_pretrained(folder))")
    for path in files:
        check_safetensors(path, setting)
    return files
