"""The base model's tensors, one at a time: from an HF folder's safetensors files, or from the
builtin model's state dict (it has no files, and is small enough to build)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ds_bilevel.builtin.model import is_builtin
from ds_bilevel.export.run_folder import ExportError, RunFolder
from ds_bilevel.integrity import check_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names (get_slice().get_dtype()) -> torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Floating-point tensors are written in the export dtype; others as they are."""
        return dtype if self.dtype.is_floating_point else self.dtype

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * self.output_dtype(dtype).itemsize


class SafetensorsFolder:
    """An HF model folder's weights (``model.safetensors`` or an index and its shards), read
    through ``safe_open`` one tensor at a time: one file is open (memory-mapped) at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / INDEX_FILE).is_file():
            files = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ExportError(f"model_name_or_path: {folder} has no {SINGLE_FILE} or {INDEX_FILE}; export streams "
                              f"safetensors weights only (re-save the base with save_pretrained)")
        self.files: dict[str, list[str]] = {}
        self.specs: list[TensorSpec] = []
        for file in files:
            check_safetensors(folder / file, "model_name_or_path")
            with safe_open(str(folder / file), "pt") as f:
                self.files[file] = list(f.keys())
                for key in self.files[file]:
                    tensor = f.get_slice(key)
                    if tensor.get_dtype() not in SAFETENSORS_DTYPES:
                        raise ExportError(f"model_name_or_path: tensor {key} in {folder / file} has dtype "
                                          f"{tensor.get_dtype()}, which export does not convert")
                    self.specs.append(TensorSpec(key, tuple(tensor.get_shape()),
                                                 SAFETENSORS_DTYPES[tensor.get_dtype()]))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in ``specs`` order, each a private copy.

        safetensors hands out views of a memory map of the whole file, and every page read
        through it stays in this process's resident set until the map goes. So each tensor is
        copied out of a handle opened for it alone (a header parse, well under a millisecond):
        resident memory then holds the tensors in flight, not the file (measured on a 111 MB
        single-file base: +24 MB instead of +126 MB).
        """
        for file, keys in self.files.items():
            for key in keys:
                with safe_open(str(self.folder / file), "pt") as f:
                    tensor = f.get_tensor(key).clone()
                yield key, tensor


class StateDictSource:
    """A model in memory (the builtin base), read through its state dict."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()
        self.specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in self.state.items()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.state.items()


@dataclass
class Base:
    """A run's base model: its weights, and what to write besides them."""

    source: SafetensorsFolder | StateDictSource
    folder: Path | None
    """The HF folder, or None for a builtin base."""
    config: dict
    """config.json, as a dict."""
    generation_config: dict
    """generation_config.json, as a dict (empty for an encoder: none is written)."""
    tokenizer: object
    conv1d: frozenset[str] = frozenset()
    """The base's Conv1D layers (GPT-2's c_attn, ...), whose weights are stored (in, out)."""


def model_folder(run: RunFolder) -> Path | None:
    """The base model's folder, or None for a builtin base."""
    if is_builtin(run.model_name_or_path):
        return None
    folder = Path(run.model_name_or_path)
    if not (folder / "config.json").is_file():
        raise ExportError(f"model_name_or_path: {run.model_name_or_path!r} is neither a builtin nor a folder with "
                          f"config.json (a relative path is taken from the current folder); pass the base's folder "
                          f"as --base_model")
    return folder


def classifier_config(config: dict, labels: list[str]) -> dict:
    """What turns an encoder's config.json into its sequence classifier's (heads.py)."""
    from ds_bilevel.heads import classification_class_name

    try:
        architecture = classification_class_name(config.get("model_type", ""))
    except ValueError as error:
        raise ExportError(str(error)) from None
    return {"architectures": [architecture], "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


def conv1d_layers(folder: Path, labels: list[str] | None, trust_remote_code: bool) -> frozenset[str]:
    """The Conv1D layers of the model the run trained, from its skeleton on the meta device (a
    config read, no weights): a square Conv1D weight looks like a Linear one, so shapes cannot tell."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ds_bilevel.adapters.base import is_conv1d

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if labels is not None:
            config.num_labels = len(labels)
        auto = AutoModelForSequenceClassification if labels is not None else AutoModelForCausalLM
        with init_empty_weights():
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ExportError(f"model_name_or_path: {folder} cannot be built as the run's model ({type(error).__name__}: "
                          f"{detail})") from None
    return frozenset(name for name, module in model.named_modules() if is_conv1d(module))


def builtin_base(run: RunFolder, vocab_size: int):
    """The run's builtin base, drawn on the device type the run drew it on (a GPU's generator gives
    other values than the CPU's from the same seed: rebuilt on the other, it would be another base)."""
    from ds_bilevel.builtin.model import build_builtin_model

    if run.builtin_drawn_on == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"checkpoint_dir: {run.path}'s base {run.model_name_or_path} was drawn on a GPU (its seeded "
                          f"values depend on the device's generator) and this machine has none; export it on a "
                          f"machine with a GPU")
    device = "cuda" if run.builtin_drawn_on == "cuda" else "cpu"
    model = build_builtin_model(run.model_name_or_path, vocab_size, seed=run.seed, labels=run.labels, device=device)
    return model.to("cpu")


def open_base(run: RunFolder) -> Base:
    """The base the run trained, as the run built it (same tokenizer, vocabulary and seed)."""
    from transformers import GenerationConfig

    from ds_bilevel.models import load_tokenizer

    tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
    folder = model_folder(run)
    if folder is None:
        model = builtin_base(run, len(tokenizer))
        model.config.architectures = [type(model).__name__]
        generation = model.generation_config.to_diff_dict() if run.labels is None else {}  # an encoder has none
        return Base(StateDictSource(model), None, model.config.to_diff_dict(), generation, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    if run.labels is not None:  # an encoder run: the export is its sequence classifier
        config = {**config, **classifier_config(config, run.labels)}
    if run.labels is not None:
        generation = {}
    elif (folder / "generation_config.json").is_file():
        generation = json.loads((folder / "generation_config.json").read_text())
    else:
        generation = GenerationConfig(**{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                         if config.get(k) is not None}).to_diff_dict()
    return Base(SafetensorsFolder(folder), folder, config, generation, tokenizer,
                conv1d_layers(folder, run.labels, run.trust_remote_code))
