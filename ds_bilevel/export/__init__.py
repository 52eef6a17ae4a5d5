"""Export a finished run: a merged HF model, or a PEFT adapter (docs/export.md).

    from ds_bilevel.export import export
    export("runs/demo", "exports/demo", format="merged", dtype="bfloat16")

The output is built in a hidden sibling folder and renamed into place at the end, so an
export that fails or is interrupted leaves no output folder (and an existing one, with
``overwrite``, untouched until the new one is complete).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ds_bilevel.export.base_source import model_folder, open_base
from ds_bilevel.export.merged import export_merged
from ds_bilevel.export.peft_format import PEFT_FORMS, export_peft
from ds_bilevel.export.run_folder import AdapterFile, ExportError, RunFolder, read_run_folder
from ds_bilevel.export.shards import parse_size

FORMATS = ("merged", "peft")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
# merged: what serving stacks load; peft: the fp32 masters as trained (an adapter is small).
DEFAULT_DTYPE = {"merged": "bfloat16", "peft": "float32"}

__all__ = ["DEFAULT_DTYPE", "DTYPES", "FORMATS", "PEFT_FORMS", "ExportError", "export"]


def check_output_dir(out: Path, overwrite: bool, run: RunFolder) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output_dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output_dir: {out} is not empty; choose another or pass --overwrite")
    inputs = [run.path, *([folder] if (folder := model_folder(run)) is not None else [])]
    for source in inputs:
        if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
            raise ExportError(f"output_dir: {out} would replace the export's input {source}; choose another folder")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh hidden sibling of ``out`` to write into, renamed to ``out`` when the block ends
    normally and removed when it raises or is interrupted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish(stage, out)


def publish(stage: Path, out: Path) -> None:
    """Rename ``stage`` to ``out``; an existing ``out`` (empty, or overwritten) is set aside first
    and only deleted once the new folder is in place."""
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}" if out.exists() else None
    try:
        if replaced is not None:
            os.replace(out, replaced)
        os.replace(stage, out)
    except BaseException:
        if replaced is not None and replaced.exists() and not out.exists():
            os.replace(replaced, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def export(run_dir: str | Path, output_dir: str | Path, format: str = "merged", dtype: str | None = None,
           overwrite: bool = False, max_shard_size: int | str = "2GB", base_model: str | None = None) -> Path:
    """Export the run in ``run_dir`` to ``output_dir`` and return that folder.

    format: "merged" (an HF model folder with the adapters folded in) or "peft" (a PEFT adapter).
    dtype: bfloat16 | float16 | float32 (default: bfloat16 for merged, float32 for peft).
    max_shard_size: bytes per weight file, e.g. "2GB" (model weights only).
    base_model: the base model folder, when it is no longer where run_config.json says.
    Raises ExportError (a ValueError) with one line naming the bad setting or file.
    """
    if format not in FORMATS:
        raise ExportError(f"format: {format!r} is not one of {list(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPE[format]
    if dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    run = read_run_folder(run_dir, base_model)
    check_output_dir(Path(output_dir), overwrite, run)
    out = Path(output_dir).resolve()
    adapters = AdapterFile(run)
    base = open_base(run)
    with staged(out) as stage:
        if format == "merged":
            export_merged(adapters, base, stage, DTYPES[dtype], max_bytes)
        else:
            export_peft(adapters, base, stage, out, DTYPES[dtype], max_bytes)
    return Path(output_dir)
