"""The method registry: one entry per method, which everything else reads.

An entry names the method's layer class (whose ``training_mode`` says how the engine trains
it, and whose ``from_config`` builds it), its exact PEFT form (export/peft_format.py), whether
the bi-level retraining phase applies, the defaults it gives unset settings, and what runs after
each optimizer step. The analytic cost in passes (bench/passes.py) follows from the mode.
Adding a method is one layer file and one entry here (docs/design.md, "Adding a method").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from ds_bilevel.adapters import bidora, bilora, bilora_sam, dora, lora
from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.levels import TrainingMode

PeftForm = Callable[[AdapterLayer], dict[str, torch.Tensor]]
AfterStep = Callable[[nn.Module, object, Callable[[list[nn.Parameter], torch.Tensor | float], None]], None]


@dataclass(frozen=True)
class Method:
    layer: type[AdapterLayer]
    """The layer class: ``from_config`` builds it around a base layer, ``training_mode`` declares
    how its levels train."""
    peft_form: PeftForm | None = None
    """The layer's tensors under PEFT LoRA's names for the same inference forward; None: the
    method has no exact PEFT form (export it merged)."""
    peft_use_dora: bool = False
    """The PEFT form is DoRA's (adapter_config.json's use_dora)."""
    retraining: bool = False
    """bilevel.retrain_steps applies: a retraining phase of the inner level after the bi-level one."""
    defaults: Mapping[str, object] = field(default_factory=dict)
    """Values ``AdapterConfig.validate`` gives the settings left unset (None) for this method."""
    after_step: AfterStep | None = None
    """Runs after every optimizer step, on the engine and on the reference alike:
    ``after_step(model, adapter_config, scale_)``, where ``scale_(params, factor)`` multiplies
    trained parameters in place (masters included). Bi-LoRA's global clip."""

    @property
    def training_mode(self) -> TrainingMode:
        return TrainingMode(self.layer.training_mode)


METHODS: Mapping[str, Method] = MappingProxyType({
    "lora": Method(lora.LoraLayer, lora.peft_form),
    # detach_norm: why each DoRA-family layer has its default is said in its file.
    "dora": Method(dora.DoraLayer, dora.peft_form, peft_use_dora=True,
                   defaults={"detach_norm": dora.DoraLayer.detach_norm_default}),
    "bilora": Method(bilora.BiLoraLayer, bilora.peft_form, retraining=True),
    "bidora": Method(bidora.BiDoraLayer, dora.peft_form, peft_use_dora=True, retraining=True,
                     defaults={"detach_norm": bidora.BiDoraLayer.detach_norm_default}),
    # Inference drops the auxiliary module: the PEFT form is the primary module's LoRA.
    "bilora_sam": Method(bilora_sam.BiLoraSamLayer, lora.peft_form, after_step=bilora_sam.after_step),
})


def method(name: str) -> Method:
    """The registry entry of ``name``; a ValueError naming the allowed ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"adapter.method: {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
