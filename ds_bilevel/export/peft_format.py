"""``peft``: a PEFT LoRA/DoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads.

PEFT's layout, read off ``get_peft_model(...).save_pretrained`` (peft 0.21):
``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r) and, for DoRA, ``...lora_magnitude_vector`` (out,); and
``adapter_config.json`` (peft_type LORA, r, lora_alpha, target_modules, use_dora, ...).

Each method's inference forward is one of PEFT's exactly (docs/export.md):
- lora: A, B;
- bilora: A' = Q, B' = P diag(lambda), same r and alpha (s B' A' = s P diag(lambda) Q);
- dora, bidora: A, B and the magnitude m, use_dora (PEFT's DoRA forward is DoRA's, and so
  BiDoRA's: the levels only change how m and A, B were trained);
- bilora_sam: the primary module A1, B1 (inference drops the auxiliary one, as merging does).

An encoder run's trained classification head is saved as PEFT saves ``modules_to_save``
(``base_model.model.classifier.out_proj.weight``, ...; task_type SEQ_CLS): load the base with
AutoModelForSequenceClassification and the run's labels, then the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds_bilevel.adapters import METHODS, AdapterConfig, AdapterLayer
from ds_bilevel.adapters.config import ALL_LINEAR
from ds_bilevel.export.base_source import Base, TensorSpec
from ds_bilevel.export.merged import adapted_weights, write_model_folder, write_tokenizer
from ds_bilevel.export.run_folder import AdapterFile, ExportError
from ds_bilevel.export.shards import make_readable
from ds_bilevel.heads import head_module

PEFT_PREFIX = "base_model.model."
BASE_SUBFOLDER = "base"


# method -> (PEFT tensors of one layer, use_dora), read off the method registry (each layer file
# defines its form). A method missing here has no exact PEFT form.
PEFT_FORMS: dict[str, tuple[Callable[[AdapterLayer], dict[str, torch.Tensor]], bool]] = {
    name: (method.peft_form, method.peft_use_dora) for name, method in METHODS.items() if method.peft_form is not None}


def module_names(specs: list[TensorSpec]) -> set[str]:
    """Every module that holds a tensor, and every module above one (from the tensor names)."""
    names = set()
    for spec in specs:
        parts = spec.name.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def peft_target_modules(config: AdapterConfig, layers: list[str], specs: list[TensorSpec]) -> list[str]:
    """The first of these that PEFT's rule (a module whose name is, or ends in ".", a target) turns
    into exactly the adapted layers: the run's target names (not the all-linear sentinel, which
    PEFT would resolve by its own rule), the adapted layers' kinds (last name components), and
    failing both the adapted layers' full names."""
    modules = module_names(specs)
    candidates = [sorted({layer.rsplit(".", 1)[-1] for layer in layers})]
    if ALL_LINEAR not in config.target_modules:
        candidates.insert(0, list(config.target_modules))
    for targets in candidates:
        if {m for m in modules if any(m == t or m.endswith("." + t) for t in targets)} == set(layers):
            return targets
    return sorted(layers)


def adapter_config(config: AdapterConfig, use_dora: bool, targets: list[str], base_path: str,
                   head: list[str] | None = None, fan_in_fan_out: bool = False) -> dict:
    """PEFT's adapter_config.json; ``head``: the classification head's modules (an encoder run);
    ``fan_in_fan_out``: the adapted layers are Conv1D (GPT-2), whose weight is stored (in, out)."""
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if head else "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": targets, "use_dora": use_dora, "use_rslora": False, "bias": "none",
            "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": head or None,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
            "revision": None}


def peft_tensors(adapters: AdapterFile, specs: list[TensorSpec], dtype: torch.dtype,
                 conv1d: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every adapted layer's PEFT tensors (the adapter's size, not the model's). A Conv1D layer's
    are the same as a Linear's: PEFT keeps A (r, in) and B (out, r) and transposes W0 instead."""
    form, _ = PEFT_FORMS[adapters.config.method]
    shapes = {spec.name: spec.shape for spec in specs}
    tensors = {}
    with torch.no_grad():
        for weight, name in adapted_weights(adapters, specs, conv1d).items():
            layer = adapters.layer(name, torch.empty(shapes[weight], device="meta"), fan_in_fan_out=name in conv1d)
            for key, value in form(layer).items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().to(dtype).contiguous()
    for name, value in adapters.head.items():  # modules_to_save, as PEFT writes them
        tensors[PEFT_PREFIX + name] = value.to(dtype).contiguous()
    return tensors


def export_peft(adapters: AdapterFile, base: Base, folder: Path, final_folder: Path, dtype: torch.dtype,
                max_bytes: int) -> list[str]:
    """Write the adapter to ``folder`` (renamed to ``final_folder`` afterwards). A builtin base has
    no folder to point at, so it is written to ``<final_folder>/base`` as a plain HF model."""
    method = adapters.config.method
    if method not in PEFT_FORMS:
        raise ExportError(f"format: method {method!r} has no exact PEFT form; use --format merged")
    specs = base.source.specs
    save_file(peft_tensors(adapters, specs, dtype, base.conv1d), str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    make_readable(folder / "adapter_model.safetensors")
    files = ["adapter_model.safetensors", "adapter_config.json"]
    if base.folder is not None:
        base_path = str(base.folder.resolve())
    else:
        write_model_folder(base, None, folder / BASE_SUBFOLDER, dtype, max_bytes)
        base_path, files = str(final_folder.resolve() / BASE_SUBFOLDER), [*files, BASE_SUBFOLDER]
    head = sorted({head_module(name) for name in adapters.head})  # classifier, bert.pooler, ...
    # The head's modules count for PEFT's matching too (RoBERTa's classifier.dense ends in "dense").
    head_specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in adapters.head.items()]
    config = adapter_config(adapters.config, PEFT_FORMS[method][1],
                            peft_target_modules(adapters.config, adapters.layers, [*specs, *head_specs]), base_path,
                            head,
                            fan_in_fan_out=any(layer in base.conv1d for layer in adapters.layers))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(base, folder)
    return files
