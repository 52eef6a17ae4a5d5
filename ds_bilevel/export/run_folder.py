"""What an export reads from a finished run folder: its settings and its adapter tensors.

A run folder (``output_dir`` of launch/train.py) holds ``run_config.json`` (the RunConfig as a
dict) and ``adapter_model.safetensors`` (every adapter parameter's fp32 master, keyed
``<layer>.<parameter>``, e.g. ``model.layers.0.self_attn.q_proj.lora_A``). A folder that a run is
writing or left unfinished (its lock is there), or whose files differ from those its run
recorded in ``run_manifest.json`` when it finished, is refused (files.check_run_folder). The adapter layers
are rebuilt one at a time with the method's own class, so no merge formula lives here. An
encoder run also holds its trained classification head there, under the model's own tensor
names (``classifier.out_proj.weight``; heads.py), and its class names in ``labels.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ds_bilevel.adapters import METHODS, AdapterConfig, AdapterLayer
from ds_bilevel.files import check_run_folder
from ds_bilevel.heads import is_head_tensor
from ds_bilevel.integrity import check_safetensors
from ds_bilevel.levels import Level

ADAPTER_FILE = "adapter_model.safetensors"
RUN_CONFIG_FILE = "run_config.json"
LABELS_FILE = "labels.json"


class ExportError(ValueError):
    """A bad export input: one line that names the setting or file at fault."""


@dataclass
class RunFolder:
    path: Path
    model_name_or_path: str
    """The base model the run trained: an HF folder or a builtin name."""
    seed: int
    """Rebuilds a builtin base exactly as the run built it."""
    trust_remote_code: bool
    adapter: AdapterConfig
    labels: list[str] | None = None
    """An encoder run's class names (labels.json), None for a causal LM."""
    builtin_drawn_on: str = "cpu"
    """A builtin base's device type, where its seeded values were drawn (the adapter file's
    metadata; runs saved before it was recorded: the CPU's)."""

    @property
    def method(self) -> str:
        return self.adapter.method


def read_adapter_config(values: dict) -> AdapterConfig:
    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExportError(f"{RUN_CONFIG_FILE}: adapter has unknown setting(s) {unknown}; "
                          f"this ds_bilevel knows {sorted(known)}")
    config = AdapterConfig(**values)
    try:
        config.validate()
    except ValueError as error:
        raise ExportError(f"{RUN_CONFIG_FILE}: {error}") from None
    return config


def read_run_folder(path: str | Path, base_model: str | None = None) -> RunFolder:
    """The run's settings; ``base_model`` replaces the recorded base (for a base that moved)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint_dir: {str(path)!r} is not a folder; give the output_dir of a training run")
    try:  # a run still writing it, stopped before its end, or files of different runs
        check_run_folder(path, [RUN_CONFIG_FILE, ADAPTER_FILE, LABELS_FILE])
    except ValueError as error:
        raise ExportError(str(error)) from None
    for name in (RUN_CONFIG_FILE, ADAPTER_FILE):
        if not (path / name).is_file():
            raise ExportError(f"checkpoint_dir: {path} has no {name}; give the output_dir of a finished training run")
    try:
        values = json.loads((path / RUN_CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"checkpoint_dir: {path / RUN_CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(values.get("model_name_or_path"), str) or not isinstance(values.get("adapter"), dict):
        raise ExportError(f"{RUN_CONFIG_FILE}: in {path}, model_name_or_path and adapter are missing")
    run = RunFolder(path=path, model_name_or_path=base_model or values["model_name_or_path"],
                    seed=int(values.get("seed", 0)), trust_remote_code=bool(values.get("trust_remote_code", False)),
                    adapter=read_adapter_config(values["adapter"]),
                    labels=json.loads((path / LABELS_FILE).read_text()) if (path / LABELS_FILE).is_file() else None)
    check_safetensors(path / ADAPTER_FILE, "checkpoint_dir")  # truncated or damaged: one clear line
    try:
        with safe_open(str(path / ADAPTER_FILE), "pt") as f:
            metadata = f.metadata() or {}
            saved_method = metadata.get("method", run.method)
            run.builtin_drawn_on = metadata.get("builtin_drawn_on", "cpu")
    except Exception as error:  # safetensors' own error type differs between versions
        raise ExportError(f"checkpoint_dir: {path / ADAPTER_FILE} is not a readable safetensors file "
                          f"({error})") from None
    if saved_method != run.method:
        raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} holds method {saved_method!r} but {RUN_CONFIG_FILE} "
                          f"says adapter.method {run.method!r}")
    return run


class AdapterFile:
    """The trained adapters of a run, rebuilt as adapter layers one at a time."""

    def __init__(self, run: RunFolder):
        self.path, self.config = run.path / ADAPTER_FILE, run.adapter
        self.layer_cls: type[AdapterLayer] = METHODS[run.method].layer
        self.param_names = self._param_names()
        with safe_open(str(self.path), "pt") as f:
            saved = list(f.keys())
            # An encoder's trained head, by the model's tensor names (small: out_features x hidden).
            self.head = {key: f.get_tensor(key) for key in saved if is_head_tensor(key)}
        keys = [key for key in saved if key not in self.head]
        if self.head and run.labels is None:
            raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} holds a classification head but {run.path} has no "
                              f"{LABELS_FILE}; give the output_dir of a finished training run")
        for key in keys:
            if key.rpartition(".")[2] not in self.param_names:
                raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} holds {key!r}, which is not a {run.method} "
                                  f"parameter ({sorted(self.param_names)})")
        self.layers = list(dict.fromkeys(key.rpartition(".")[0] for key in keys))  # adapted layers, file order
        if not self.layers:
            raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} holds no adapter tensors")

    def _param_names(self) -> list[str]:
        """The method's parameter names, from a throwaway layer on the meta device."""
        size = max(self.layer_cls.rank_fields(self.config).values())
        with torch.device("meta"):
            layer = self.layer_cls.from_config(nn.Linear(size, size, bias=False), self.config)
        return [name for level in Level for name, _ in layer.level_parameters(level)]

    def _tensors(self, layer: str, meta: bool) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), "pt") as f:
            if meta:
                return {name: torch.empty(f.get_slice(f"{layer}.{name}").get_shape(), device="meta")
                        for name in self.param_names}
            return {name: f.get_tensor(f"{layer}.{name}").float() for name in self.param_names}

    @torch.no_grad()
    def layer(self, name: str, base_weight: torch.Tensor, load_values: bool = True,
              fan_in_fan_out: bool = False) -> AdapterLayer:
        """The method's layer around a bias-free nn.Linear holding ``base_weight`` (out, in) in
        fp32 (a bias-free Conv1D holding it (in, out), with ``fan_in_fan_out``), with this layer's
        trained tensors (their shapes only, on the meta device, unless ``load_values``). The base
        weight may be a meta tensor where only the adapters matter."""
        with torch.device("meta"):
            if fan_in_fan_out:
                from transformers.pytorch_utils import Conv1D

                linear = Conv1D(base_weight.shape[1], base_weight.shape[0])
                linear.register_parameter("bias", None)  # the merge reads the weight only
            else:
                linear = nn.Linear(base_weight.shape[1], base_weight.shape[0], bias=False)
            layer = self.layer_cls.from_config(linear, self.config)
        state = {"base_layer.weight": base_weight.float(), **self._tensors(name, meta=not load_values)}
        try:
            layer.load_state_dict(state, assign=True)  # strict: every name and shape must fit
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} does not fit layer {name} "
                              f"({tuple(base_weight.shape)}): {detail}") from None
        return layer.eval()
