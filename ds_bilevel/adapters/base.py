"""The adapter layer contract: wrap a frozen linear layer, declare two parameter levels.

Wrap-and-replace as in PEFT: the original layer stays as ``base_layer``, so a base
state dict (``...q_proj.base_layer.weight`` aside) loads unchanged and the base
weights are never copied. Layouts follow PyTorch: W0 is (out, in). The base is an
nn.Linear or transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc), which stores its
weight (in, out): ``base_weight()`` gives it as (out, in) either way, as PEFT's
``fan_in_fan_out`` does, so the methods' formulas never see the stored layout.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from ds_bilevel.levels import Level, LevelLayer, TrainingMode
from ds_bilevel.zero_access import gathered

if TYPE_CHECKING:  # annotations only: adapters/config.py reads the method registry, above this file
    from ds_bilevel.adapters.config import AdapterConfig


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT, ...): a linear layer whose weight is stored (in, out).
    Nothing is a Conv1D before its module is imported, so the check does not import transformers
    (about 1 s of a refused launch, issue 13 item 2)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer an adapter can wrap, None for any other module.
    From attributes, not the weight's shape: under ZeRO-3 a partitioned weight is empty."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.nx, module.nf
    return None


class _AttachRegularizer(torch.autograd.Function):
    """Identity on the layer output whose backward also sends d(total)/d(reg) = 1 / calls into ``reg``.

    It ties a regulariser's backward to the backward of the layer that computed it, so
    under ZeRO-3 it runs while the layer's parameters are gathered (the pattern of
    Megatron's MoE auxiliary-loss scaler). The regulariser then needs no gather of its own.
    ``calls`` (a one-element list, read in backward, once the forward is over) counts the layer's
    calls in this model forward: a layer called k times (ALBERT's shared blocks, DeBERTa-v2/v3's
    query_proj and key_proj applied again to the relative positions with share_att_key) attaches
    its term k times, and each carries 1/k of it, so the model's regulariser counts every layer
    once, as ``levels.regularizer`` does. Every call attaches alike, so checkpointing's
    recomputation sees the forward it recomputes.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, reg: torch.Tensor, calls: list[int]) -> torch.Tensor:
        ctx.reg_shape, ctx.calls = reg.shape, calls
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = 1.0 / max(ctx.calls[0], 1)
        return grad_output, grad_output.new_full(ctx.reg_shape, weight, dtype=torch.float32), None


def _count_call(calls: list[int]) -> None:
    """One more call of the layer in this model forward; not a recomputation, which runs inside a
    backward (autograd's graph task id is -1 outside one). Under torch.compile the call breaks the
    graph and runs as Python (not decorated: torch.compiler.disable imports torch._dynamo, a second
    of every refused launch)."""
    if torch._C._current_graph_task_id() == -1:
        calls[0] += 1


class AdapterLayer(nn.Module, LevelLayer):
    """A frozen ``base_layer`` plus trainable adapter parameters split into two levels
    (``levels.LevelLayer``).

    Subclasses implement ``from_config``, ``adapted_forward``, ``merged_weight`` and
    ``_level_names``, and may override ``regularizer`` and ``rank_fields``. The base weight is
    frozen here, once. ``training_mode`` tells the engine how the levels are trained:
    ``TrainingMode.ONE_LEVEL`` (only the inner level exists), ``BILEVEL`` (inner on D1, outer on
    D2 with a hypergradient) or ``SHARPNESS`` (inner descends, outer ascends, in one pass).
    """

    training_mode = TrainingMode.ONE_LEVEL
    ascend_in_backward = False
    """Set by the engine in ``TrainingMode.SHARPNESS``: the outer level's parameters receive
    -dL/dparam from backward (the ascent, with no extra pass); a layer of that mode honours it."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        features = layer_features(base_layer)
        if features is None:
            raise TypeError(f"adapters wrap nn.Linear or transformers' Conv1D layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features, self.out_features = features
        # Conv1D stores W0 as (in, out) (PEFT's fan_in_fan_out); adapters keep PyTorch's layout
        # for their own factors (A (r, in), B (out, r)), so PEFT's tensors fit either way.
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.rank = rank
        self.scaling = alpha / rank  # s = alpha / r (Hu et al. 2021, section 4.1)
        # Dropout hits the adapter path only (the released BiDoRA code also dropped
        # the frozen path, which changes the pretrained function).
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Set by ``attach_regularizers`` (levels.set_regularization): which levels' regularisers the forward attaches to
        # its output, and the factor each gets (1 / (layers x accumulation steps)).
        self.attached_levels: tuple[Level, ...] = ()
        self.attached_scale = 1.0
        self.attached_calls = [0]  # this model forward's calls (new_forward): see _AttachRegularizer

    @classmethod
    def from_config(cls, base_layer: nn.Module, config: AdapterConfig) -> AdapterLayer:
        """This method's layer around ``base_layer``, with the settings of ``config`` it reads
        (inject_adapters builds every layer through it)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapted_forward(x)
        if self.attached_levels and torch.is_grad_enabled():
            terms = [t for level in self.attached_levels if (t := self.regularizer(level)) is not None]
            if terms:
                _count_call(self.attached_calls)
                out = _AttachRegularizer.apply(out, torch.stack(terms).sum() * self.attached_scale,
                                               self.attached_calls)
        return out

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in): the stored weight, or its transposed view for a Conv1D base."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    # The base layer's weight and bias seen through the adapter layer, read-only, as PEFT's tuner
    # layers offer them (BaseTunerLayer.weight/bias): some forwards read the weight of a layer they
    # call, T5's feed-forward casts its input to wo.weight.dtype (without these, adapting wo was an
    # AttributeError in the first forward). Properties register nothing: named_parameters,
    # state_dict, the adapter files and ZeRO-3's partitioning and hooks see these tensors once, as
    # base_layer.weight/bias. As stored, like PEFT's: a Conv1D base's weight is (in, out) (the
    # formulas read base_weight()), and under ZeRO-3 it is partitioned outside the layer's forward.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @classmethod
    def rank_fields(cls, config) -> dict[str, int]:
        """The config fields that set a rank of this method's factors, with their values.

        ``inject_adapters`` checks each against every target layer before it changes the model.
        """
        return {"rank": config.rank}

    # ---- level API -------------------------------------------------------------------
    def _level_names(self, level: Level) -> tuple[str, ...]:
        """Names of this layer's own parameters that belong to ``level``."""
        raise NotImplementedError

    def level_parameters(self, level: Level) -> list[tuple[str, nn.Parameter]]:
        return [(name, getattr(self, name)) for name in self._level_names(level)]

    def regularizer(self, level: Level) -> torch.Tensor | None:
        """This layer's weighted regulariser for ``level`` (None when it has none)."""
        return None

    def attach_regularizers(self, levels: tuple[Level, ...], scale: float) -> None:
        self.attached_levels, self.attached_scale = tuple(levels), scale
        self.new_forward()

    def new_forward(self) -> None:
        """A model forward begins: its calls are counted afresh (the nodes of earlier forwards keep
        their own count)."""
        self.attached_calls = [0]

    # ---- merging ---------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for level in Level for _, p in self.level_parameters(level)]

    def merged_weight(self) -> torch.Tensor:
        """The (out, in) weight that a plain nn.Linear needs to reproduce this layer at
        inference (a Conv1D base stores its transpose). Reads the base weight: call inside
        ``gathered_layer`` under ZeRO-3."""
        raise NotImplementedError

    def gathered_layer(self) -> contextlib.AbstractContextManager:
        """Gather this layer's base and adapter parameters (one layer, on every rank)."""
        return gathered([*self.base_layer.parameters(), *self.adapter_parameters()])

    def merged_linear(self) -> nn.Module:
        """A new layer of the base's kind (nn.Linear, or Conv1D) with the merged weight; the model
        is left unchanged."""
        with self.gathered_layer(), torch.no_grad():
            weight = self.merged_weight()
            bias = self.base_layer.bias
            if self.fan_in_fan_out:
                from transformers.pytorch_utils import Conv1D

                linear = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
                weight = weight.T  # Conv1D's own (in, out) layout
            else:
                linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


@torch.no_grad()
def kaiming_uniform_(weight: torch.Tensor) -> None:
    """LoRA's A init: nn.Linear's default (Kaiming-uniform, a = sqrt(5)), as PEFT.

    Drawn in fp32 and then cast: torch's uniform_ on a bf16 tensor consumes the generator
    differently, so a bf16 run started from other adapter values than the fp32 run with the
    same seed (measured: up to 0.25 apart in k_proj/v_proj of builtin:micro-llama)."""
    values = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    nn.init.kaiming_uniform_(values, a=5**0.5)
    weight.copy_(values)
