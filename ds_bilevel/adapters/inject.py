"""Put adapter layers into a model by target-module names, and take them out again (merge)."""

from __future__ import annotations

from torch import nn

from ds_bilevel.adapters.base import AdapterLayer, layer_features
from ds_bilevel.adapters.config import ALL_LINEAR, AdapterConfig
from ds_bilevel.adapters.registry import METHODS
from ds_bilevel.levels import is_tagged


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every layer an adapter can wrap (nn.Linear, transformers' Conv1D), in model order."""
    return [name for name, m in model.named_modules() if layer_features(m) is not None]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def output_layer_names(model: nn.Module) -> set[str]:
    """The output head (a causal LM's lm_head, tied or not), which all-linear leaves out as PEFT does:
    adapting it would add a vocabulary-sized factor and change every logit directly."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def layer_kinds(names: list[str]) -> dict[str, int]:
    """How many adapted layers of each kind (the last name component), in model order:
    {"q_proj": 32, ...}. What the run prints at start-up and writes to summary.json."""
    kinds: dict[str, int] = {}
    for name in names:
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def inject_adapters(model: nn.Module, config: AdapterConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Wrap every linear layer (nn.Linear or Conv1D) that ``config.target_modules`` selects with
    ``config.method``'s layer.

    Freezes every base parameter first: after this call the only trainable
    parameters are the adapters' own. Returns the adapted layer names. A target
    that matches nothing is an error listing the model's linear layers. Layers inside
    the modules named in ``exclude`` (a classification head, trained whole) are never adapted.
    """
    config.validate()
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("model already holds adapter layers; inject into a fresh base model")
    names = target_layer_names(model, config, exclude)
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, METHODS[config.method].layer.from_config(model.get_submodule(name), config))
    return names


def _not_linear(model: nn.Module, target: str) -> str | None:
    """Why ``target``, which matches no linear layer, cannot be adapted when it names another module
    or a parameter (Mixtral's experts), else None."""
    for name, module in model.named_modules():
        if name and _matches(name, target):
            fused = [n for n, p in module.named_parameters() if p.dim() == 3]
            why = (f"its parameters {fused} are 3-D (experts fused into one tensor, as transformers 5 stores "
                   f"mixture-of-experts layers)" if fused else "it is not a linear layer")
            return f"{target!r} names {name} ({type(module).__name__}), which no adapter wraps: {why}"
    for name, param in model.named_parameters():
        if _matches(name, target):
            shape = "a 3-D parameter (experts fused into one tensor, as transformers 5 stores " \
                    "mixture-of-experts layers)" if param.dim() == 3 else f"a {param.dim()}-D parameter"
            return f"{target!r} names {name}, {shape}, which no adapter wraps"
    return None


def target_layer_names(model: nn.Module, config: AdapterConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """The linear layers ``config`` adapts, in model order, after checking that every target
    matches a layer and every rank fits every layer. Reads only shapes: the launcher runs it on
    a model built on the meta device before any process group starts (ds_bilevel.validation).

    ``all-linear`` selects every nn.Linear and Conv1D but the output head and the excluded modules
    (a classifier's head): the transformer blocks' projections in every family tested (docs/usage.md).
    """
    layer_cls = METHODS[config.method].layer
    linears = [n for n in linear_layer_names(model) if not any(n == e or n.startswith(e + ".") for e in exclude)]
    short = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if config.target_modules == [ALL_LINEAR]:
        heads = output_layer_names(model)
        names = [n for n in linears if n not in heads]
        if not names:
            raise ValueError(f"adapter.target_modules: {ALL_LINEAR} selects nothing in {type(model).__name__}: it has "
                             f"no linear layer besides its output head; allowed: layer names")
    else:
        chosen = {t: [n for n in linears if _matches(n, t)] for t in config.target_modules}
        missing = [t for t, names in chosen.items() if not names]
        for target in missing:
            if (why := _not_linear(model, target)) is not None:
                raise ValueError(f"adapter.target_modules: {why}; allowed: linear layers, named {short}")
        if missing:
            raise ValueError(f"adapter.target_modules: {missing} match no linear layer; "
                             f"the model's linear layers are named {short}")
        names = sorted({n for names in chosen.values() for n in names}, key=linears.index)
    fits = {n: min(layer_features(model.get_submodule(n))) for n in names}
    smallest = min(names, key=fits.__getitem__)  # the bound for every targeted layer
    for field_name, rank in layer_cls.rank_fields(config).items():
        if rank > fits[smallest]:
            in_f, out_f = layer_features(model.get_submodule(smallest))
            raise ValueError(f"adapter.{field_name}: {rank} exceeds layer {smallest} ({out_f} x "
                             f"{in_f}); use at most {fits[smallest]}, the smallest targeted layer's size")
    return names


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain layer of its base's kind (nn.Linear or Conv1D) holding
    its merged weight, in place.

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
