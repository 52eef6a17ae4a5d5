"""The shared vocabulary of the two optimisation levels.

Every adapter declares which of its parameters belong to which level through
``AdapterLayer.level_parameters()``; nothing in the project finds a level by
matching parameter names.

- ``Level.INNER``: the lower level (LoRA A/B, BiLoRA P/Q, BiDoRA direction,
  Bi-LoRA primary module). Trained on D1 (or on all data for one-level methods).
- ``Level.OUTER``: the upper level (BiLoRA lambda, BiDoRA magnitude). For
  Bi-LoRA the auxiliary ascent module plays this role.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Level(str, Enum):
    INNER = "inner"
    OUTER = "outer"


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All adapter layers of ``model`` with their qualified names, in module order."""
    from ds_bilevel.adapters.base import AdapterLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def named_level_parameters(model: nn.Module, level: Level) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every adapter parameter of ``level``."""
    out = []
    for layer_name, layer in adapter_layers(model):
        for local_name, param in layer.level_parameters(level):
            out.append((f"{layer_name}.{local_name}", param))
    return out


def level_parameters(model: nn.Module, level: Level) -> list[nn.Parameter]:
    return [p for _, p in named_level_parameters(model, level)]


def regularizer(model: nn.Module, level: Level) -> torch.Tensor | None:
    """Mean over adapted layers of their (already weighted) regularisers of ``level``, or None.

    A mean, not a sum, as in AdaLoRA's orthogonal regulariser and BiDoRA's code: the
    weight then means the same whatever the number of adapted layers.
    """
    terms = [t for _, layer in adapter_layers(model) if (t := layer.regularizer(level)) is not None]
    return torch.stack([t.float() for t in terms]).mean() if terms else None


def set_regularization(model: nn.Module, levels: tuple[Level, ...], accumulation_steps: int = 1) -> None:
    """Make every adapter layer add its regularisers of ``levels`` to the loss's gradient
    during its own forward/backward (see ``adapters.base._AttachRegularizer``).

    Each layer's term is scaled by 1 / (layers x accumulation_steps): the layer runs once
    per micro-batch, and the gradient must be that of ``regularizer(model, level)``, the
    mean over layers, once per optimizer step. (DeepSpeed averages over ranks, where every
    rank adds the same term.)
    """
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.attached_levels = tuple(levels)
        layer.attached_scale = 1.0 / (len(layers) * accumulation_steps)
