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

The rest of the vocabulary lives here too, below everything that uses it: the two objectives
(``Objective``), how a method trains its levels (``TrainingMode``), the kinds of step a schedule
is made of (``StepKind``), and what a layer with levels offers (``LevelLayer``, which
``adapters.base.AdapterLayer`` implements). This module imports nothing from the package.
"""

from __future__ import annotations

import abc
from enum import Enum

import torch
from torch import nn


class _Word(str, Enum):
    """A str-valued enum that prints as its value (and compares and hashes as the string)."""

    def __str__(self) -> str:
        return self.value


class Level(str, Enum):
    INNER = "inner"
    OUTER = "outer"


class Objective(_Word):
    INNER = "inner"  # L_tr on a D1 batch (with the inner regularisers)
    OUTER = "outer"  # L_val on a D2 batch (with the outer regularisers)

    @property
    def level(self) -> Level:
        """The level whose regularisers the objective includes: R1 (and BiDoRA's direction term) the
        inner objective, the binary lambda penalty R2 the outer one."""
        return Level(self.value)


class TrainingMode(_Word):
    """How a method trains its levels (declared by its adapter layer)."""

    ONE_LEVEL = "one_level"  # lora, dora: only the inner level exists
    BILEVEL = "bilevel"  # bilora, bidora: inner steps on D1, outer steps on D2 with a hypergradient
    SHARPNESS = "sharpness"  # bilora_sam: one pass, inner descends, outer (auxiliary) ascends


class StepKind(_Word):
    """The kinds of step a schedule is made of (schedule.events)."""

    INNER = "inner"
    OUTER = "outer"
    SHARPNESS = "sharpness"
    RETRAIN = "retrain"  # an inner step of the retraining phase (on D1 + D2)


class LevelLayer(abc.ABC):
    """What a module with parameters in levels offers (adapters.base.AdapterLayer implements it):
    its parameters of each level, its weighted regulariser of each level, and a switch that makes
    its forward attach chosen regularisers to its output. Layers are found by this type, never by
    parameter names."""

    training_mode: TrainingMode = TrainingMode.ONE_LEVEL

    @abc.abstractmethod
    def level_parameters(self, level: Level) -> list[tuple[str, nn.Parameter]]:
        """(local name, parameter) of this layer's own parameters of ``level``."""

    @abc.abstractmethod
    def regularizer(self, level: Level) -> torch.Tensor | None:
        """This layer's weighted regulariser of ``level`` (None when it has none)."""

    @abc.abstractmethod
    def attach_regularizers(self, levels: tuple[Level, ...], scale: float) -> None:
        """From now on, the forward adds the regularisers of ``levels``, times ``scale``, to the
        loss's gradient (see ``set_regularization``)."""

    @abc.abstractmethod
    def new_forward(self) -> None:
        """A model forward begins: the layer's attached terms count its calls in it afresh."""


# The attribute that tags a parameter outside adapter layers with its level (``assign_level``).
LEVEL_TAG = "ds_bilevel_level"


def assign_level(module: nn.Module, level: Level) -> None:
    """Make every parameter of ``module`` trainable at ``level`` (a task head trained whole)."""
    for param in module.parameters():
        param.requires_grad_(True)
        setattr(param, LEVEL_TAG, level)


def is_tagged(param: nn.Parameter) -> bool:
    return hasattr(param, LEVEL_TAG)


def adapter_layers(model: nn.Module) -> list[tuple[str, LevelLayer]]:
    """All adapter layers (``LevelLayer``) of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LevelLayer)]


def training_mode(model: nn.Module) -> TrainingMode:
    """The training mode every adapter layer of ``model`` declares."""
    modes = {layer.training_mode for _, layer in adapter_layers(model)}
    if len(modes) != 1:
        raise ValueError(f"adapter layers disagree on the training mode: {sorted(modes)}")
    return TrainingMode(modes.pop())


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

    Each layer's term is scaled by 1 / (layers x accumulation_steps): attached for all of a
    pass's ``accumulation_steps`` micro-batches, the gradient is that of
    ``regularizer(model, level)``, the mean over layers, once per optimizer step. The engine
    attaches them for the first micro-batch only (``accumulation_steps`` 1) and ``()`` after
    its backward. (DeepSpeed averages over ranks, where every rank adds the same term.)
    """
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.attach_regularizers(tuple(levels), 1.0 / (len(layers) * accumulation_steps))
    # Each model forward counts its layers' calls afresh (a layer called twice carries half its term
    # per call: adapters.base._AttachRegularizer).
    handle = model.__dict__.pop("_ds_bilevel_new_forward", None)
    if handle is not None:
        handle.remove()
    if levels:
        def new_forward(module, args) -> None:  # returns None: the forward's inputs stay as they are
            for layer in layers:
                layer.new_forward()

        model.__dict__["_ds_bilevel_new_forward"] = model.register_forward_pre_hook(new_forward)
