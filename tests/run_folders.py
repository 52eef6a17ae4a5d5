"""A finished run folder written by hand, and adapters given random values, for the export tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds_bilevel.config import RunConfig, config_to_dict
from ds_bilevel.levels import Level, adapter_layers, named_level_parameters


def write_run(folder: Path, model: torch.nn.Module, run: RunConfig, labels: list[str] | None = None) -> Path:
    """A finished run folder, as TrainingRecipe.save and setup write it (with an encoder's labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    named = {level: named_level_parameters(model, level) for level in Level}
    tensors = {name: p.detach().float().clone() for params in named.values() for name, p in params}
    levels = {name: level.value for level, params in named.items() for name, _ in params}
    save_file(tensors, str(folder / "adapter_model.safetensors"),
              metadata={"method": run.adapter.method, "levels": json.dumps(levels)})
    (folder / "run_config.json").write_text(json.dumps(config_to_dict(run), indent=2))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1, zero_auxiliary: bool = False) -> None:
    """Random adapter values, so that every dW != 0 (magnitudes near ||W0||_row, lambda far from
    uniform); with ``zero_auxiliary`` Bi-LoRA's auxiliary module zero, as at inference."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for level in Level:
            for name, param in layer.level_parameters(level):
                noise = torch.randn(param.shape, generator=gen)
                if name == "magnitude":
                    param.mul_(1 + 0.1 * noise)
                else:
                    param.copy_(noise if name == "lambda_raw" else 0.1 * noise)
        if zero_auxiliary and hasattr(layer, "aux_B"):
            layer.aux_B.zero_()
