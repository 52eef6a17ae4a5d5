"""Adapter layers, one file per method, and their registry.

``METHODS`` (registry.py) maps a method name to its entry: the layer class, which builds
itself from an ``AdapterConfig`` with ``from_config`` and declares its two levels and its
training mode (levels.py), its PEFT form, its defaults and its step hook.
"""

from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.adapters.bidora import BiDoraLayer
from ds_bilevel.adapters.bilora import BiLoraLayer
from ds_bilevel.adapters.bilora_sam import BiLoraSamLayer, auxiliary_sq_norm, clip_auxiliary_, scale_auxiliary_
from ds_bilevel.adapters.config import AdapterConfig
from ds_bilevel.adapters.dora import DoraLayer
from ds_bilevel.adapters.inject import inject_adapters, merge_adapters
from ds_bilevel.adapters.lora import LoraLayer
from ds_bilevel.adapters.registry import METHODS, Method

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "BiDoraLayer",
    "BiLoraLayer",
    "BiLoraSamLayer",
    "DoraLayer",
    "LoraLayer",
    "Method",
    "auxiliary_sq_norm",
    "clip_auxiliary_",
    "inject_adapters",
    "merge_adapters",
    "scale_auxiliary_",
]
