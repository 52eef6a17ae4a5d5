"""Adapter layers, one file per method, and their registry.

``METHODS`` maps a method name to its layer class; each class builds itself from an
``AdapterConfig`` with ``from_config`` and declares its two levels (see levels.py).
"""

from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.adapters.bidora import BiDoraLayer
from ds_bilevel.adapters.bilora import BiLoraLayer
from ds_bilevel.adapters.config import AdapterConfig
from ds_bilevel.adapters.dora import DoraLayer
from ds_bilevel.adapters.inject import inject_adapters, merge_adapters
from ds_bilevel.adapters.lora import LoraLayer
from ds_bilevel.adapters.sam import BiLoraSamLayer, auxiliary_sq_norm, clip_auxiliary_, scale_auxiliary_

METHODS: dict[str, type[AdapterLayer]] = {
    "lora": LoraLayer,
    "dora": DoraLayer,
    "bilora": BiLoraLayer,
    "bidora": BiDoraLayer,
    "bilora_sam": BiLoraSamLayer,
}

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "BiDoraLayer",
    "BiLoraLayer",
    "BiLoraSamLayer",
    "DoraLayer",
    "LoraLayer",
    "auxiliary_sq_norm",
    "clip_auxiliary_",
    "inject_adapters",
    "merge_adapters",
    "scale_auxiliary_",
]
