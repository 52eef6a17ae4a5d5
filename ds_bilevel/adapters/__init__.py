"""Adapter layers, one file per method, and their registry.

``METHODS`` maps a method name to its layer class; each class builds itself from an
``AdapterConfig`` with ``from_config`` and declares its two levels (see levels.py).
"""

from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.adapters.config import AdapterConfig
from ds_bilevel.adapters.dora import DoraLayer
from ds_bilevel.adapters.inject import inject_adapters, merge_adapters
from ds_bilevel.adapters.lora import LoraLayer

METHODS: dict[str, type[AdapterLayer]] = {
    "lora": LoraLayer,
    "dora": DoraLayer,
}

__all__ = ["METHODS", "AdapterConfig", "AdapterLayer", "DoraLayer", "LoraLayer", "inject_adapters", "merge_adapters"]
