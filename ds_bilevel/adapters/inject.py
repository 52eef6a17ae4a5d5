"""Put adapter layers into a model by target-module names, and take them out again (merge)."""

from __future__ import annotations

from torch import nn

from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.adapters.config import AdapterConfig
from ds_bilevel.levels import is_tagged


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_adapters(model: nn.Module, config: AdapterConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Wrap every nn.Linear whose name matches a target with ``config.method``'s layer.

    Freezes every base parameter first: after this call the only trainable
    parameters are the adapters' own. Returns the adapted layer names. A target
    that matches nothing is an error listing the model's linear layers. Layers inside
    the modules named in ``exclude`` (a classification head, trained whole) are never adapted.
    """
    from ds_bilevel.adapters import METHODS

    config.validate()
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("model already holds adapter layers; inject into a fresh base model")
    names = target_layer_names(model, config, exclude)
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, METHODS[config.method].from_config(model.get_submodule(name), config))
    return names


def target_layer_names(model: nn.Module, config: AdapterConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """The nn.Linear layers ``config`` adapts, in model order, after checking that every target
    matches a layer and every rank fits every layer. Reads only shapes: the launcher runs it on
    a model built on the meta device before any process group starts (ds_bilevel.validation)."""
    from ds_bilevel.adapters import METHODS

    layer_cls = METHODS[config.method]
    linears = [n for n in linear_layer_names(model) if not any(n == e or n.startswith(e + ".") for e in exclude)]
    chosen = {t: [n for n in linears if _matches(n, t)] for t in config.target_modules}
    missing = [t for t, names in chosen.items() if not names]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"adapter.target_modules: {missing} match no linear layer; "
                         f"the model's linear layers are named {short}")
    names = sorted({n for names in chosen.values() for n in names}, key=linears.index)
    fits = {n: min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    smallest = min(names, key=fits.__getitem__)  # the bound for every targeted layer
    for field_name, rank in layer_cls.rank_fields(config).items():
        if rank > fits[smallest]:
            layer = model.get_submodule(smallest)
            raise ValueError(f"adapter.{field_name}: {rank} exceeds layer {smallest} ({layer.out_features} x "
                             f"{layer.in_features}); use at most {fits[smallest]}, the smallest targeted layer's size")
    return names


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain nn.Linear holding its merged weight, in place.

    Under ZeRO-3 each layer is gathered on its own (``AdapterLayer.merged_linear``).
    """
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]:
        _set_submodule(model, name, layer.merged_linear())
    return model


def named_base_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The frozen base's parameters under their original names (``.base_layer`` removed);
    neither adapters nor modules trained whole (``levels.assign_level``) are part of it."""
    adapter_ids = {id(p) for _, layer in model.named_modules() if isinstance(layer, AdapterLayer)
                   for p in layer.adapter_parameters()}
    return [(name.replace(".base_layer.", "."), p) for name, p in model.named_parameters()
            if id(p) not in adapter_ids and not is_tagged(p)]
