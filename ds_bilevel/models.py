"""Model and tokenizer loading: the builtin tiny LLaMA, or an HF folder."""

from __future__ import annotations

from pathlib import Path

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


def load_model(name: str, vocab_size: int, seed: int, trust_remote_code: bool = False):
    """The causal LM, in fp32 (DeepSpeed casts to bf16 itself and keeps fp32 masters for adapters)."""
    if is_builtin(name):
        return build_builtin_model(name, vocab_size, seed=seed)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype="float32", trust_remote_code=trust_remote_code)
