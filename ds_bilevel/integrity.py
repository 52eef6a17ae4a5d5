"""Integrity checks of weight files that come from outside the run, before anything reads them.

Weights are read and written as safetensors only (no pickle: loading one cannot run code).
safetensors' own reader fails on a damaged file with a message about its buffers
("MetadataIncompleteBuffer"); these checks name the setting and the file instead, and cost
one header read per file (docs/failures.md).
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SUB_BYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")  # packed: sizes not checked


def check_safetensors(path: Path, setting: str) -> dict:
    """Refuse a truncated or corrupt safetensors file: ValueError('<setting>: <file> ...'). Every
    header entry must describe its own bytes (a known dtype, a shape of non-negative integers,
    offsets that hold exactly shape x dtype bytes, inside the file). Returns the header
    (name -> {"dtype", "shape", "data_offsets"}), without ``__metadata__``."""
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
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{setting}: {path} has a corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{setting}: {path} has a corrupt safetensors header (a JSON {type(header).__name__}, "
                         f"not an object of tensors)")
    header.pop("__metadata__", None)
    ends = []
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{setting}: {path} has a corrupt safetensors header: tensor {name!r} {problem}; copy "
                             f"or export it again")
        ends.append(entry["data_offsets"][1])
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        raise ValueError(f"{setting}: {path} is truncated or damaged ({size} bytes, its header describes "
                         f"{expected}); copy or export it again")
    return header


def _entry_problem(entry) -> str:
    if not isinstance(entry, dict):
        return f"is described by {json.dumps(entry)[:40]}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES and dtype not in SUB_BYTE_DTYPES:
        return f"has dtype {dtype!r}, which safetensors does not define"
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        return f"has shape {json.dumps(shape)[:40]}; allowed: a list of non-negative integers"
    integers = isinstance(offsets, list) and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    if not (integers and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
        return f"has data_offsets {json.dumps(offsets)[:40]}; allowed: [begin, end] with 0 <= begin <= end"
    if dtype in DTYPE_BYTES:
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
            return (f"has shape {shape} {dtype} ({numel * DTYPE_BYTES[dtype]} bytes) but data_offsets {offsets} "
                    f"({offsets[1] - offsets[0]} bytes)")
    return ""


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
