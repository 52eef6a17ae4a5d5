"""``builtin:tiny-llama``: a LLaMA-architecture model built from a LlamaConfig with a fixed seed."""

from __future__ import annotations

import torch

BUILTIN_PREFIX = "builtin:"

# name -> LlamaConfig kwargs. Sizes are chosen to train in seconds on 2 CPU cores.
BUILTIN_MODELS = {
    "tiny-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128),
    # A smaller sibling for fast tests.
    "micro-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_llama_config(name: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig

    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        allowed = [BUILTIN_PREFIX + k for k in BUILTIN_MODELS]
        raise ValueError(f"model_name_or_path: unknown builtin {name!r}; builtins are {allowed}")
    kwargs = {**BUILTIN_MODELS[key], "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 3, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **overrides}
    return LlamaConfig(**kwargs)


def build_builtin_model(name: str, vocab_size: int, seed: int = 0, **overrides):
    """The same weights on every rank and every run: the seed fixes the init."""
    from transformers import LlamaForCausalLM

    config = builtin_llama_config(name, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
