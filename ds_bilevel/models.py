"""Model and tokenizer loading: a builtin model, or an HF folder; a causal LM, or an encoder
with a sequence-classification head (the rule is in heads.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ds_bilevel.builtin.model import build_builtin_model, builtin_names, is_builtin, is_builtin_encoder
from ds_bilevel.ds_config import DeepSpeedSettings


def load_tokenizer(name: str, trust_remote_code: bool = False):
    if is_builtin(name):
        from ds_bilevel.builtin.tokenizer import load_builtin_tokenizer

        return load_builtin_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if not tokenizer("a", add_special_tokens=False).input_ids:
        raise ValueError(f"model_name_or_path: the tokenizer in {name} encodes text to nothing "
                         f"(a sentencepiece tokenizer.model needs protobuf to convert)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer(name: str, trust_remote_code: bool = False, encoder: bool | None = None) -> None:
    """What the data code needs of the tokenizer, before launch: it loads and encodes text, it has a
    pad id (its pad token, or EOS standing in), and a causal LM's has an EOS (appended to every
    answer, so that the model learns to stop). An encoder needs no EOS (data.tokenize)."""
    try:
        tokenizer = load_tokenizer(name, trust_remote_code)
    except (OSError, TypeError) as error:  # no tokenizer files, or files transformers cannot read
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"model_name_or_path: {name} has no tokenizer transformers can load ({type(error).__name__}: "
                         f"{detail}); allowed: a folder with its tokenizer files") from None
    encoder = is_encoder_model(name, trust_remote_code) if encoder is None else encoder
    if not encoder and tokenizer.eos_token_id is None:
        raise ValueError(f"model_name_or_path: the tokenizer in {name} has no eos_token, which a causal LM's answers "
                         f"end with; allowed: a tokenizer with eos_token set (tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"model_name_or_path: the tokenizer in {name} has neither a pad_token nor an eos_token to "
                         f"pad batches with; allowed: a tokenizer with pad_token set (tokenizer_config.json)")
    if encoder and not is_builtin(name) and tokenizer.pad_token_id == tokenizer.eos_token_id:
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).is_encoder_decoder:
            # BART/T5 classifiers read the state at each row's EOS and require one per row: padding
            # with EOS would give padded rows more (transformers: "All examples must have the same
            # number of <eos> tokens"), mid-training.
            raise ValueError(f"model_name_or_path: the tokenizer in {name} pads with its eos_token, which an "
                             f"encoder-decoder classifier reads as the end of the text; allowed: a tokenizer "
                             f"whose pad_token differs from eos_token (tokenizer_config.json)")


def is_encoder_model(name: str, trust_remote_code: bool = False) -> bool:
    """Whether ``name`` is trained as an encoder with a classification head (heads.is_encoder)."""
    if is_builtin(name):
        if name not in builtin_names():
            raise ValueError(f"model_name_or_path: unknown builtin {name!r}; builtins are {builtin_names()}")
        return is_builtin_encoder(name)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    from transformers import AutoConfig

    from ds_bilevel.heads import is_encoder

    return is_encoder(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))


def encoder_labels(name: str, trust_remote_code: bool, data, *record_sets) -> list[str] | None:
    """An encoder's class names (``data.class_labels`` over ``record_sets``), or None for a causal LM.
    ``data`` is the run's DataConfig: an encoder trains on classification data only."""
    if not is_encoder_model(name, trust_remote_code):
        return None
    if data.format != "classification":
        raise ValueError(f"data.format: {data.format!r} needs a causal LM, but {name} is an encoder (heads.py); "
                         f"allowed with it: classification")
    from ds_bilevel.data import class_labels

    return class_labels(data, *record_sets)


def encoder_skeleton(name: str, trust_remote_code: bool = False):
    """An encoder's model with its head on the meta device (shapes only, no weights), or None when
    ``name`` is not an encoder (or not a model at all: the causal-LM checks report that)."""
    try:
        if not is_encoder_model(name, trust_remote_code):
            return None
    except ValueError:
        return None
    from accelerate import init_empty_weights

    if is_builtin(name):
        from transformers import RobertaForSequenceClassification

        from ds_bilevel.builtin.model import builtin_roberta_config

        with init_empty_weights():
            return RobertaForSequenceClassification._from_config(builtin_roberta_config(name, 512, ["0", "1"]))
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    # init_empty_weights gives every registered parameter a new meta tensor, which unties shared
    # weights: an encoder-decoder's (BART, T5) encoder and decoder embeddings are its `shared`
    # table, stored once. Tied again, the file's single copy counts for all three names, as
    # transformers loads it (model_checks.model_skeleton does the same for a tied LM head; before,
    # every BART and T5 folder was refused as lacking model.decoder.embed_tokens.weight).
    skeleton.tie_weights()
    return skeleton


# transformers reads the ZeRO-3 config from this object while it lives: from_pretrained then
# builds and loads the model partitioned (deepspeed.zero.Init), never whole on one rank.
_HF_DEEPSPEED_CONFIG = None


def load_model(name: str, vocab_size: int, seed: int, trust_remote_code: bool = False,
               ds_config: dict | DeepSpeedSettings | None = None, labels: list[str] | None = None):
    """The causal LM, or with ``labels`` (class names) the encoder with its classification head,
    in the run's precision (bf16 when the DeepSpeed config enables it).

    Under ZeRO-3 (``ds_config`` given with stage 3) every parameter is partitioned as it is
    created: a 70B model is never materialised on one rank. Adapters are added afterwards
    (DeepSpeed partitions them at initialize) and read base weights one layer at a time.
    """
    global _HF_DEEPSPEED_CONFIG
    settings = DeepSpeedSettings.read(ds_config)
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    _HF_DEEPSPEED_CONFIG = None  # transformers holds it weakly: dropping it ends ZeRO-3 mode
    zero3 = settings.zero_stage == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers then creates the model under deepspeed.zero.Init and initialises or
        # loads each parameter gathered on its own (from_pretrained and from_config alike).
        _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(settings.config)
    if is_builtin(name):
        # Built on this rank's GPU where there is one (zero.Init places ZeRO-3's partitions itself).
        device = None if zero3 or not torch.cuda.is_available() else torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return build_builtin_model(name, vocab_size, seed=seed, dtype=dtype, labels=labels, device=device)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    if labels is not None:
        return load_classifier(name, labels, seed, dtype, trust_remote_code)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                use_safetensors=True)  # never unpickle a checkpoint


def load_classifier(name: str, labels: list[str], seed: int, dtype: torch.dtype, trust_remote_code: bool):
    """AutoModelForSequenceClassification with ``len(labels)`` classes. A head the folder does not
    hold (a masked-LM checkpoint) is initialised from (seed, parameter name), as the builtins are:
    the same on every rank and at every ZeRO stage."""
    from transformers import AutoModelForSequenceClassification

    from ds_bilevel.builtin.model import seeded_init_
    from ds_bilevel.heads import head_names

    model, info = AutoModelForSequenceClassification.from_pretrained(
        name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        output_loading_info=True, ignore_mismatched_sizes=True)
    fresh = [*info.get("missing_keys", ()), *(key for key, *_ in info.get("mismatched_keys", ()))]
    for head in head_names(model):  # the classifier, and a pooler a masked-LM checkpoint lacks
        if any(key == head or key.startswith(head + ".") for key in fresh):
            seeded_init_(model.get_submodule(head), seed, head_init_std(model.config), prefix=head + ".")
    return model


def head_init_std(config) -> float:
    """The standard deviation a fresh head is drawn with: the one transformers' own init reads
    (PreTrainedModel._init_weights), in its order: ``initializer_range`` (BERT, RoBERTa, DeBERTa;
    0.02 when unset), ``init_std`` (BART and its kin: mBART, Pegasus, LED), and T5's
    ``initializer_factor``, scaled by d_model ** -0.5 as T5's init scales its classification head
    (the factor alone, 1.0, would draw the head 6x wider than T5 does at d_model 32, 32x at 1024).
    Not every config has ``initializer_range``: reading it alone failed every BART and T5 run."""
    if hasattr(config, "initializer_range"):
        return config.initializer_range or 0.02
    if hasattr(config, "init_std"):
        return config.init_std
    if hasattr(config, "initializer_factor"):
        return config.initializer_factor * (config.d_model ** -0.5 if hasattr(config, "d_model") else 1.0)
    return getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02
