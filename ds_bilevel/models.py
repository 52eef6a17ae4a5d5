"""Model and tokenizer loading: the builtin tiny LLaMA, or an HF folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ds_bilevel.builtin.model import build_builtin_model, is_builtin


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


# transformers reads the ZeRO-3 config from this object while it lives: from_pretrained then
# builds and loads the model partitioned (deepspeed.zero.Init), never whole on one rank.
_HF_DEEPSPEED_CONFIG = None


def load_model(name: str, vocab_size: int, seed: int, trust_remote_code: bool = False, ds_config: dict | None = None):
    """The causal LM, in the run's precision (bf16 when the DeepSpeed config enables it).

    Under ZeRO-3 (``ds_config`` given with stage 3) every parameter is partitioned as it is
    created: a 70B model is never materialised on one rank. Adapters are added afterwards
    (DeepSpeed partitions them at initialize) and read base weights one layer at a time.
    """
    global _HF_DEEPSPEED_CONFIG
    bf16 = bool(ds_config and ds_config.get("bf16", {}).get("enabled"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    _HF_DEEPSPEED_CONFIG = None  # transformers holds it weakly: dropping it ends ZeRO-3 mode
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers then creates the model under deepspeed.zero.Init and initialises or
        # loads each parameter gathered on its own (from_pretrained and from_config alike).
        _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(ds_config)
    if is_builtin(name):
        return build_builtin_model(name, vocab_size, seed=seed, dtype=dtype)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
