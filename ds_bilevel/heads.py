"""Encoders with a classification head: which models get one, where it is, which level trains it.

The rule (one place): a model is an *encoder*, trained for classification through a
sequence-classification head (``AutoModelForSequenceClassification``), when its config is an
encoder-decoder (``is_encoder_decoder``) or transformers has a masked-LM class for its
``model_type`` (BERT, RoBERTa, DeBERTa, DistilBERT, ModernBERT, ...; the builtin
``tiny-roberta``). Every other model is a *decoder*, trained as a causal LM: classification
labels are written as words and predicted as the answer.

The head is the model's top-level module named ``classifier``, ``score`` or
``classification_head`` (PEFT's ``modules_to_save`` for SEQ_CLS). It is trained whole, at the
inner level (BiDoRA: "direction and task head at the lower level"); adapters never wrap its
layers.
"""

from __future__ import annotations

from torch import nn

from ds_bilevel.levels import Level, assign_level

HEAD_MODULES = ("classifier", "score", "classification_head")
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


def head_name(model: nn.Module) -> str:
    names = [name for name, _ in model.named_children() if name in HEAD_MODULES]
    if len(names) != 1:
        raise ValueError(f"model_name_or_path: {type(model).__name__} has {len(names)} classification heads "
                         f"among its top-level modules {[n for n, _ in model.named_children()]}; expected "
                         f"exactly one named one of {list(HEAD_MODULES)}")
    return names[0]


def is_head_tensor(name: str) -> bool:
    """Whether a saved tensor (``<module>.<...>``) belongs to the head rather than to an adapter."""
    return name.split(".", 1)[0] in HEAD_MODULES


def train_head(model: nn.Module) -> str:
    """Make the head trainable at ``HEAD_LEVEL``; returns its name."""
    name = head_name(model)
    assign_level(model.get_submodule(name), HEAD_LEVEL)
    return name
