"""Builtin models built from a config with a fixed seed: ``builtin:tiny-llama`` (a LLaMA causal LM)
and ``builtin:tiny-roberta`` (a RoBERTa encoder with a sequence-classification head)."""

from __future__ import annotations

import contextlib

import torch

from ds_bilevel.zero_access import gathered

BUILTIN_PREFIX = "builtin:"

# name -> LlamaConfig kwargs. Sizes are chosen to train in seconds on 2 CPU cores.
BUILTIN_MODELS = {
    "tiny-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128),
    # A smaller sibling for fast tests.
    "micro-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # LLaMA-2-7B's shapes (6.7B parameters, random weights) for scale runs under ZeRO-3; the
    # vocabulary is padded to 32000 rows beyond the builtin tokenizer's ids.
    "llama-2-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             vocab_size=32000),
    # 0.82B parameters with the builtin vocabulary (largest tensor 11.5M): the frozen base
    # dominates a rank's memory, for ZeRO-3 scaling measurements (bench/zero3_scaling.py).
    "mid-llama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    # LLaMA-3-8B's shapes (8.0B parameters, random weights, vocabulary padded to 128256) for
    # GPU throughput runs (bench/gpu.py).
    "llama-3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             vocab_size=128256, rope_theta=500000.0),
}


# name -> RobertaConfig kwargs: encoders, built as RobertaForSequenceClassification (the
# classification head on the first token, as RoBERTa's). Positions start after the pad id (3),
# so 132 position rows hold sequences of up to 128 tokens. No dropout (as the builtin LLaMA): a
# run is then deterministic, the same on any number of ranks.
BUILTIN_ENCODERS = {
    "tiny-roberta": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=132, type_vocab_size=1, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0),
}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def is_builtin_encoder(name: str) -> bool:
    return name.removeprefix(BUILTIN_PREFIX) in BUILTIN_ENCODERS


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + k for k in (*BUILTIN_MODELS, *BUILTIN_ENCODERS)]


def builtin_roberta_config(name: str, vocab_size: int, labels: list[str]):
    """The encoder's config; ``labels`` (class names, index = class id) set its head's size."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=vocab_size, **BUILTIN_ENCODERS[name.removeprefix(BUILTIN_PREFIX)],
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, id2label=dict(enumerate(labels)),
                         label2id={label: i for i, label in enumerate(labels)})


def builtin_llama_config(name: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig

    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        raise ValueError(f"model_name_or_path: unknown builtin {name!r}; builtins are {builtin_names()}")
    kwargs = {"vocab_size": vocab_size, **BUILTIN_MODELS[key], "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 3, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **overrides}
    return LlamaConfig(**kwargs)


def build_builtin_model(name: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                        labels: list[str] | None = None, device: torch.device | str | None = None, **overrides):
    """The same weights on every rank and every run: the seed fixes the init.

    Built with ``from_config`` so that under an active ZeRO-3 config (HfDeepSpeedConfig)
    transformers creates it partitioned; ``seeded_init_`` makes the values the same either way.
    An encoder needs ``labels``, the class names its head predicts.

    Start-up cost (issue 13): transformers' own init is skipped (``seeded_init_`` overwrites every
    parameter anyway; it was two thirds of the build), and ``device`` (outside ZeRO-3, where
    zero.Init places the partitions) builds the model where it trains, in ``dtype``, so that
    the seeded values are drawn there: on a GPU in milliseconds instead of a minute on the host.
    """
    from transformers import LlamaForCausalLM, RobertaForSequenceClassification

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5.x
        from transformers.modeling_utils import no_init_weights

    if is_builtin_encoder(name):
        if not labels:
            raise ValueError(f"model_name_or_path: {name} is an encoder; it needs classification data "
                             f"(data.format classification) to size its head")
        config, model_cls = builtin_roberta_config(name, vocab_size, labels), RobertaForSequenceClassification
    else:
        config, model_cls = builtin_llama_config(name, vocab_size, **overrides), LlamaForCausalLM
    place = torch.device(device) if device is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), no_init_weights(), place:
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=dtype)
    seeded_init_(model, seed, config.initializer_range)
    return model


def draw_device_type() -> str:
    """Where this machine draws a builtin's seeded values: every build on a machine with a GPU
    (one rank's, or ZeRO-3's partitions gathered there) is on it, else on the CPU. The two
    generators give different values from the same seed, so a run's builtin base is rebuilt
    (export, resume) only on the device type it was drawn on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float, prefix: str = "") -> None:
    """Give every parameter values that depend only on (seed, its name): N(0, std) for weights,
    ones for RMSNorm/LayerNorm scales, zeros for biases (LLaMA's and RoBERTa's init). The result
    is the same whether the model was built whole or partitioned under ZeRO-3 (there each tensor
    is gathered on its own and written by rank 0), which construction-order RNG draws would not
    guarantee. The values are drawn on the parameter's device (in fp32): the same on every rank
    and run of one device type, but a GPU's generator gives other values than the CPU's.
    ``prefix``: the module's qualified name when it is part of a model (a head)."""
    import zlib

    for name, param in model.named_parameters():
        with gathered([param], modifier_rank=0):
            if name.endswith(("norm.weight", "LayerNorm.weight", "bias")):
                param.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            key = seed * 1_000_003 + zlib.crc32((prefix + name).encode())
            generator = torch.Generator(param.device).manual_seed(key)
            param.copy_(torch.randn(param.shape, generator=generator, device=param.device).mul_(std))
