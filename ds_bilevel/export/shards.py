"""Sharded safetensors output in transformers' layout, written shard by shard as it fills.

The shard plan comes first, from the tensors' shapes alone, so the file names can carry the
shard count (``model-00001-of-00004.safetensors``) before any data is read. One shard is
``model.safetensors`` with no index, as ``save_pretrained`` writes it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds_bilevel.export.base_source import INDEX_FILE, SINGLE_FILE, TensorSpec
from ds_bilevel.export.run_folder import ExportError

# Decimal units as transformers' max_shard_size ("5GB" = 5e9 bytes), binary ones as written.
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from 2000000, "2GB", "500MB" or "10MiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?", str(value).strip().upper())
    if not match or float(match[1]) * _UNITS[match[2] or "B"] < 1:
        raise ExportError(f"max_shard_size: {value!r} is not a size such as 2GB, 500MB or 10MiB")
    return int(float(match[1]) * _UNITS[match[2] or "B"])


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order; a shard closes before it would pass ``max_bytes`` (a
    tensor larger than that gets a shard of its own)."""
    shards, current, filled = [], [], 0
    for spec in specs:
        size = spec.nbytes(dtype)
        if current and filled + size > max_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(spec.name)
        filled += size
    return [*shards, current] if current else shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    make_readable(path)


def make_readable(path: Path) -> None:
    """The permissions of an ordinary new file (safetensors writes 0600), so that a serving
    process running as another user can read the export."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], specs: list[TensorSpec], dtype: torch.dtype,
                  folder: Path, max_bytes: int) -> list[str]:
    """Write ``tensors`` (already in their output dtype, arriving in ``specs`` order) into shards
    of at most ``max_bytes``, each as soon as it is full, then the index. Returns the files.

    Only the shard being filled is held in memory.
    """
    shards = plan_shards(specs, dtype, max_bytes)
    files = shard_names(len(shards))
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    missing = [len(names) for names in shards]
    buffer: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        buffer[name] = tensor
        index = shard_of[name]
        missing[index] -= 1
        if missing[index] == 0:
            save_shard(buffer, folder / files[index])
            buffer = {}
    if any(missing) or buffer:
        raise RuntimeError(f"export: the base yielded its tensors out of plan ({sum(missing)} missing)")
    if len(files) > 1:
        index = {"metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs),
                              "total_size": sum(s.nbytes(dtype) for s in specs)},
                 "weight_map": {name: files[shard_of[name]] for name in sorted(shard_of)}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files = [*files, INDEX_FILE]
    return files

