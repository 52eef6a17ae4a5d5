"""Tiny random models of the families docs/usage.md lists, built from configs (no downloads), and
saved as HF folders the way their families ship (several safetensors files, a tokenizer, a chat
template), for the family, export and tokenizer tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from ds_bilevel.builtin.tokenizer import TOKENIZER_DIR

VOCAB = 416  # the builtin sentencepiece tokenizer's size
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"

# family -> (config class, causal-LM class, config kwargs, the layers all-linear adapts: kind -> count)
CAUSAL = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False},
              {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "gate_proj": 2, "up_proj": 2, "down_proj": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
             {"c_attn": 2, "c_proj": 4, "c_fc": 2}),  # Conv1D layers, lm_head tied
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 3},
             {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL,
                 {"query_key_value": 2, "dense": 2, "dense_h_to_4h": 2, "dense_4h_to_h": 2}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"hidden_size": 32, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4},
               {"query_key_value": 2, "dense": 2, "dense_h_to_4h": 2, "dense_4h_to_h": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "word_embed_proj_dim": 32},
            {"k_proj": 2, "v_proj": 2, "q_proj": 2, "out_proj": 2, "fc1": 2, "fc2": 2}),
    # Experts are fused 3-D parameters and the router is no nn.Linear: attention only.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**SMALL, "num_key_value_heads": 2, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2},
                {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}),
}

# family -> (config class, classifier class, config kwargs, layers all-linear adapts, head modules)
ENCODERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", {**SMALL, "max_position_embeddings": 64},
             {"query": 2, "key": 2, "value": 2, "dense": 6}, ["bert.pooler", "classifier"]),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {**SMALL, "max_position_embeddings": 64, "relative_attention": True, "position_buckets": 8,
                    "pos_att_type": ["p2c", "c2p"]},
                   {"query_proj": 2, "key_proj": 2, "value_proj": 2, "pos_key_proj": 2, "pos_query_proj": 2,
                    "dense": 6},
                   ["pooler", "classifier"]),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {**SMALL, "max_position_embeddings": 68, "type_vocab_size": 1},
                {"query": 2, "key": 2, "value": 2, "dense": 6}, ["classifier"]),
}


def config_of(family: str, **extra):
    config_cls, _, kwargs, *_ = CAUSAL[family] if family in CAUSAL else ENCODERS[family]
    ids = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    return getattr(transformers, config_cls)(**ids, **kwargs, **extra)


def causal_lm(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(transformers, CAUSAL[family][1])(config_of(family)).eval()


def classifier(family: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(transformers, ENCODERS[family][1])(config_of(family, num_labels=num_labels)).eval()


def write_tokenizer_files(folder: Path) -> None:
    """The builtin sentencepiece tokenizer as a LLaMA folder ships one: tokenizer.model,
    tokenizer_config.json, special_tokens_map.json and a chat template file."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)
    (folder / "special_tokens_map.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}\n')
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def save_causal_folder(family: str, folder: Path, seed: int = 0) -> Path:
    """A causal-LM folder in several safetensors files, with the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    causal_lm(family, seed).save_pretrained(folder, max_shard_size="40KB")
    write_tokenizer_files(folder)
    return folder
