"""Shared fixtures for the adapter tests: tiny models built from configs (no downloads).

Helpers are fixtures (not imports) so that the test files need no package structure.
"""

from __future__ import annotations

import numerics
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.levels import adapter_layers

METHOD_NAMES = ["lora", "dora", "bilora", "bidora", "bilora_sam"]
VOCAB = 97


@pytest.fixture(params=METHOD_NAMES)
def method(request) -> str:
    """Every registered method; a test narrows it with @pytest.mark.parametrize("method", [...])."""
    return request.param


def _make_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def make_llama():
    """make_llama(dtype=fp32, seed=0) -> a fresh tiny LlamaForCausalLM in eval mode."""
    return _make_llama


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(123))


def _adapter_config(method: str, **overrides) -> AdapterConfig:
    # rank 4, alpha 8: s = 2, so a randomised adapter moves the weights visibly.
    fields = {"method": method, "rank": 4, "alpha": 8.0, "aux_rank": 3} | overrides
    return AdapterConfig(**fields)


@pytest.fixture
def adapter_config():
    """adapter_config(method, **overrides) -> AdapterConfig (rank 4, alpha 8, aux_rank 3, LLaMA targets)."""
    return _adapter_config


@pytest.fixture
def adapted_llama():
    """adapted_llama(method, dtype=fp32, **overrides) -> (model, config) with adapters injected."""

    def build(method: str, dtype: torch.dtype = torch.float32, **overrides):
        model = _make_llama(dtype)
        config = _adapter_config(method, **overrides)
        inject_adapters(model, config)
        return model, config

    return build


@pytest.fixture
def randomize():
    """randomize(model, seed=1, std=0.1): random values in every adapter parameter (numerics.randomize)."""
    return numerics.randomize


@pytest.fixture
def max_rel_err():
    """max_rel_err(actual, expected) = max|a - e| / max|e| (numerics.rel_err)."""
    return numerics.rel_err


@torch.no_grad()
def _zero_auxiliary(model: torch.nn.Module) -> None:
    for _, layer in adapter_layers(model):
        if hasattr(layer, "aux_B"):
            layer.aux_B.zero_()


@pytest.fixture
def zero_auxiliary():
    """zero_auxiliary(model): Bi-LoRA's auxiliary module set to 0 (what inference uses); no-op otherwise."""
    return _zero_auxiliary
