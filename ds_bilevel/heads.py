"""Encoders with a classification head: which models get one, where it is, which level trains it.

The rule (one place): a model is an *encoder*, trained for classification through a
sequence-classification head (``AutoModelForSequenceClassification``), when its config is an
encoder-decoder (``is_encoder_decoder``: BART, T5, whose head reads the decoder's state at the
last EOS) or transformers has a masked-LM class for its ``model_type`` (BERT, RoBERTa, DeBERTa,
DistilBERT, ModernBERT, ...; the builtin ``tiny-roberta``). Every other model is a *decoder*,
trained as a causal LM: classification labels are written as words and predicted as the answer.
T5's ``wo`` is adapted like any layer: its forward reads ``wo.weight``, which an adapter layer exposes (PEFT's way).

The head is the model's top-level module named ``classifier``, ``score`` or
``classification_head`` (PEFT's ``modules_to_save`` for SEQ_CLS), together with the pooler the
classifier reads the encoder through when the model has one outside it: BERT's and ALBERT's
``<encoder>.pooler``, DeBERTa's top-level ``pooler``, DistilBERT's ``pre_classifier``. A masked-LM
checkpoint has no pooler, so it is as new as the classifier; a pretrained one is a start, as for
transformers' own fine-tuning. The head is trained whole, at the inner level (BiDoRA: "direction
and task head at the lower level"), saved and exported with the adapters; adapters never wrap
its layers.
"""

from __future__ import annotations

from torch import nn

from ds_bilevel.levels import Level, assign_level

HEAD_MODULES = ("classifier", "score", "classification_head")
# Modules between the encoder and the classifier, outside both (BERT/ALBERT: <encoder>.pooler,
# DeBERTa: pooler, DistilBERT: pre_classifier): trained and saved with the head, or they would stay
# as initialised, never saved, and differ at every load of an export (issue 16).
POOLERS = ("pooler", "pre_classifier")
HEAD_LEVEL = Level.INNER


def is_encoder(config) -> bool:
    """The rule above, for a transformers config or its dict (config.json)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    values = config if isinstance(config, dict) else config.to_dict()
    return bool(values.get("is_encoder_decoder")) or values.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def classification_class_name(model_type: str) -> str:
    """transformers' sequence-classification class for ``model_type`` (for a merged export's config)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"model_name_or_path: transformers has no sequence-classification class for "
                         f"model_type {model_type!r}")
    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type]


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The head's modules, in model order: the pooler (when there is one outside the classifier)
    and the classifier."""
    heads = [name for name, _ in model.named_children() if name in HEAD_MODULES]
    if len(heads) != 1:
        raise ValueError(f"model_name_or_path: {type(model).__name__} has {len(heads)} classification heads "
                         f"among its top-level modules {[n for n, _ in model.named_children()]}; expected "
                         f"exactly one named one of {list(HEAD_MODULES)}")
    poolers = [name for name, module in model.named_modules() if name.count(".") <= 1
               and name.rsplit(".", 1)[-1] in POOLERS and any(True for _ in module.parameters())]
    return (*poolers, heads[0])


def head_module(tensor: str) -> str | None:
    """The head module a saved tensor (``<module>.<...>``) belongs to, or None for an adapter's:
    ``classifier.out_proj.weight`` -> ``classifier``, ``bert.pooler.dense.weight`` -> ``bert.pooler``."""
    parts = tensor.split(".")
    if parts[0] in HEAD_MODULES or parts[0] in POOLERS:
        return parts[0]
    if len(parts) > 2 and parts[1] in POOLERS:
        return ".".join(parts[:2])
    return None


def is_head_tensor(name: str) -> bool:
    """Whether a saved tensor belongs to the head rather than to an adapter."""
    return head_module(name) is not None


def train_head(model: nn.Module) -> tuple[str, ...]:
    """Make the head (pooler included) trainable at ``HEAD_LEVEL``; returns its modules' names."""
    names = head_names(model)
    for name in names:
        assign_level(model.get_submodule(name), HEAD_LEVEL)
    return names
