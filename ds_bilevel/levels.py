"""The shared vocabulary of the two optimisation levels.

Every adapter declares which of its parameters belong to which level through
``AdapterLayer.level_parameters()``; nothing in the project finds a level by
matching parameter names.

Besides adapter layers, whole modules can be given a level with ``assign_level`` (an
encoder's classification head): their parameters carry the level as a tag.

- ``Level.INNER``: the lower level (LoRA A/B, BiLoRA P/Q, BiDoRA direction,
  Bi-LoRA primary module, a classification head). Trained on D1 (or on all data for
  one-level methods).
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


# The attribute that tags a parameter outside adapter layers with its level (``assign_level``).
LEVEL_TAG = "ds_bilevel_level"


def assign_level(module: nn.Module, level: Level) -> None:
    """Make every parameter of ``module`` trainable at ``level`` (a task head trained whole)."""
    for param in module.parameters():
        param.requires_grad_(True)
        setattr(param, LEVEL_TAG, level)


def is_tagged(param: nn.Parameter) -> bool:
    return hasattr(param, LEVEL_TAG)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All adapter layers of ``model`` with their qualified names, in module order."""
    from ds_bilevel.adapters.base import AdapterLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def named_level_parameters(model: nn.Module, level: Level) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every adapter parameter of ``level``, then every parameter
    tagged with ``level`` by ``assign_level``."""
    out = []
    for layer_name, layer in adapter_layers(model):
        for local_name, param in layer.level_parameters(level):
            out.append((f"{layer_name}.{local_name}", param))
    return out + [(name, p) for name, p in model.named_parameters() if getattr(p, LEVEL_TAG, None) == level]


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
