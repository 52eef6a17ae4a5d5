"""Injection by target names into LLaMA and encoder models (RoBERTa, DeBERTa-v2), and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from ds_bilevel.adapters import AdapterLayer, inject_adapters, merge_adapters
from ds_bilevel.levels import Level, level_parameters

ENCODER_SIZES = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 40, "num_labels": 3}


def roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(**ENCODER_SIZES)).eval()


def deberta_v2():
    torch.manual_seed(0)
    config = DebertaV2Config(**ENCODER_SIZES, relative_attention=True, position_buckets=8,
                             pos_att_type=["p2c", "c2p"])
    return DebertaV2ForSequenceClassification(config).eval()


ENCODERS = {
    "roberta": (roberta, ["query", "value"]),
    "deberta_v2": (deberta_v2, ["query_proj", "value_proj"]),
}


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_encoder_injection_is_a_noop_then_merges_exactly(encoder, method, adapter_config, randomize,
                                                         zero_auxiliary, max_rel_err):
    build, targets = ENCODERS[encoder]
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(5))
    base_logits = build()(ids).logits
    model = build()
    names = inject_adapters(model, adapter_config(method, target_modules=targets))
    assert len(names) == 4 and {n.rsplit(".", 1)[-1] for n in names} == set(targets)
    assert all(isinstance(model.get_submodule(n), AdapterLayer) for n in names)
    assert (model(ids).logits - base_logits).abs().max() <= 1e-6
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for level in Level for p in level_parameters(model, level)}
    randomize(model)
    zero_auxiliary(model)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merge_adapters(copy.deepcopy(model))(ids).logits
    assert max_rel_err(adapted, base_logits) > 1e-4
    assert max_rel_err(merged, adapted) < 1e-5


def test_full_dotted_names_and_suffixes_select_layers(make_llama, adapter_config):
    model = make_llama()
    names = inject_adapters(model, adapter_config("lora", target_modules=["model.layers.1.mlp.down_proj",
                                                                          "v_proj"]))
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
                     "model.layers.1.mlp.down_proj"]


def test_inject_freezes_every_base_parameter(make_llama, adapter_config):
    model = make_llama()
    inject_adapters(model, adapter_config("bidora", target_modules=["q_proj"]))
    adapter_ids = {id(p) for level in Level for p in level_parameters(model, level)}
    frozen = [n for n, p in model.named_parameters() if id(p) not in adapter_ids]
    assert "lm_head.weight" in frozen and "model.embed_tokens.weight" in frozen
    assert all(not model.get_parameter(n).requires_grad for n in frozen)


def test_targets_matching_nothing_list_the_linear_layer_names(make_llama, adapter_config):
    with pytest.raises(ValueError, match=r"\['query'\] match no linear layer.*'q_proj'.*'v_proj'"):
        inject_adapters(make_llama(), adapter_config("lora", target_modules=["q_proj", "query"]))


def test_rank_larger_than_a_layer_is_rejected_before_the_model_changes(make_llama, adapter_config):
    model = make_llama()
    with pytest.raises(ValueError, match=r"adapter.rank: 20 exceeds layer model.layers.0.self_attn.k_proj "
                                         r"\(16 x 32\); use at most 16"):
        inject_adapters(model, adapter_config("bilora", rank=20, target_modules=["k_proj"]))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_injecting_twice_is_rejected(make_llama, adapter_config):
    model = make_llama()
    inject_adapters(model, adapter_config("lora"))
    with pytest.raises(ValueError, match="already holds adapter layers"):
        inject_adapters(model, adapter_config("lora"))
