"""For the export tests: a finished run folder written by hand, the tiny HF base it adapts, and
what the adapted model computes (``Run``); loaders of an export's merged folder and PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from numerics import randomize
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.config import RunConfig, config_to_dict
from ds_bilevel.levels import Level, adapter_layers, named_level_parameters
from ds_bilevel.models import load_tokenizer


def write_run(folder: Path, model: torch.nn.Module, run: RunConfig, labels: list[str] | None = None) -> Path:
    """A finished run folder, as TrainingRecipe.save and setup write it (with an encoder's labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    named = {level: named_level_parameters(model, level) for level in Level}
    tensors = {name: p.detach().float().clone() for params in named.values() for name, p in params}
    levels = {name: level.value for level, params in named.items() for name, _ in params}
    save_file(tensors, str(folder / "adapter_model.safetensors"),
              metadata={"method": run.adapter.method, "levels": json.dumps(levels)})
    (folder / "run_config.json").write_text(json.dumps(config_to_dict(run), indent=2))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(5))


class Run:
    """A run folder and what its adapted model computes at inference on ``tokens``."""

    def __init__(self, folder: Path, model: torch.nn.Module, run: RunConfig, base_logits: torch.Tensor):
        self.dir, self.base_logits = write_run(folder, model, run), base_logits
        self.tokens = tokens_for(model.config.vocab_size)
        with torch.no_grad():
            for _, layer in adapter_layers(model):  # Bi-LoRA infers without its auxiliary module;
                if hasattr(layer, "aux_B"):  # the saved file keeps it, so the export must drop it
                    layer.aux_B.zero_()
            self.logits = model.eval()(self.tokens).logits


def adapted_run(folder: Path, model: torch.nn.Module, base_name: str, method: str) -> Run:
    with torch.no_grad():
        base_logits = model.eval()(tokens_for(model.config.vocab_size)).logits
    adapter = AdapterConfig(method=method, rank=4, alpha=8.0, aux_rank=3)
    torch.manual_seed(0)
    inject_adapters(model, adapter)
    randomize(model)
    return Run(folder, model, RunConfig(model_name_or_path=base_name, output_dir=str(folder), adapter=adapter),
               base_logits)


def save_llama_base(folder: Path) -> Path:
    """A tiny LLaMA (untied head) and the builtin tokenizer, saved as an HF folder in several files."""
    tokenizer = load_tokenizer("builtin:micro-llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="30KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def load_merged(folder: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def load_peft(folder: Path):
    from peft import PeftModel

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder).eval()


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()
