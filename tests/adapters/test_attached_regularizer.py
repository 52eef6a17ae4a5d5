"""Regularisers attached in the layer's forward give the gradient of the explicit mean regulariser.

The engine uses the attached form (it works under ZeRO-3, where parameters exist only inside
their layer's forward and backward); ``levels.regularizer`` is the explicit definition.
"""

import pytest
import torch

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.levels import Level, level_parameters, regularizer, set_regularization


def adapted(method: str, **overrides):
    model = build_builtin_model("builtin:micro-llama", vocab_size=64, seed=0)
    torch.manual_seed(0)
    inject_adapters(model, AdapterConfig(method=method, rank=4, **overrides))
    with torch.no_grad():
        for level in Level:
            for p in level_parameters(model, level):
                p.add_(torch.randn_like(p) * 0.1)
    return model


CASES = [("bilora", {"orth_reg_weight": 0.3}, Level.INNER),
         ("bilora", {"lambda_param": "binary", "binary_reg_weight": 0.7}, Level.OUTER),
         ("bidora", {"direction_orth_weight": 0.2}, Level.INNER)]


@pytest.mark.parametrize(("method", "overrides", "level"), CASES)
@pytest.mark.parametrize("accumulation", [1, 3])
def test_attached_gradient_equals_explicit(method, overrides, level, accumulation):
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    explicit, attached = adapted(method, **overrides), adapted(method, **overrides)
    params = [*level_parameters(explicit, Level.INNER), *level_parameters(explicit, Level.OUTER)]
    (explicit(tokens).logits.float().square().mean() + regularizer(explicit, level)).backward()
    set_regularization(attached, (level,), accumulation_steps=accumulation)
    for _ in range(accumulation):  # the regulariser part accumulates to one full term
        (attached(tokens).logits.float().square().mean() / accumulation).backward()
    others = [*level_parameters(attached, Level.INNER), *level_parameters(attached, Level.OUTER)]
    for expected, got in zip(params, others, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-7)


def test_nothing_attached_without_grad_or_levels():
    model = adapted("bilora", orth_reg_weight=0.3)
    tokens = torch.randint(0, 64, (1, 6))
    set_regularization(model, (Level.INNER,))
    with torch.no_grad():
        with_levels = model(tokens).logits
    set_regularization(model, ())
    torch.testing.assert_close(model(tokens).logits, with_levels, rtol=0, atol=0)  # forward values untouched


def albert():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0)), ["query", "value"]


def deberta_v3():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2, relative_attention=True, position_buckets=8, max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pooler_dropout=0.0)), ["query_proj", "key_proj", "value_proj"]


@pytest.mark.parametrize(("family", "method", "overrides", "checkpointing"), [
    (albert, "bilora", {"orth_reg_weight": 0.3}, False),  # one block group called num_hidden_layers times
    (deberta_v3, "bilora", {"orth_reg_weight": 0.3}, False),  # query/key_proj called again on the positions
    (deberta_v3, "bilora", {"orth_reg_weight": 0.3}, True),  # (transformers' ALBERT has no checkpointing)
    (deberta_v3, "bidora", {"direction_orth_weight": 0.2}, False),
    (deberta_v3, "bidora", {"direction_orth_weight": 0.2}, True),
], ids=["albert-bilora", "deberta_v3-bilora", "deberta_v3-bilora-checkpointing", "deberta_v3-bidora",
        "deberta_v3-bidora-checkpointing"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_layer_called_several_times_counts_its_regulariser_once(family, method, overrides, checkpointing,
                                                                  accumulation):
    """Each layer's term is attached at every call and weighed by 1 / calls, so the gradient is the
    explicit mean over layers (levels.regularizer, the reference's), whatever the model reuses; with
    checkpointing too, whose recomputation calls the layers again inside backward. Before, ALBERT's
    shared layers counted it 4 times and DeBERTa-v3's query/key projections twice (the BiLoRA
    paper's model)."""
    from ds_bilevel.heads import head_names, train_head

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model, targets = family()
        inject_adapters(model, AdapterConfig(method=method, rank=4, target_modules=targets, **overrides),
                        exclude=head_names(model))
        train_head(model)
        with torch.no_grad():
            torch.manual_seed(1)
            for level in Level:
                for p in level_parameters(model, level):
                    p.add_(torch.randn_like(p) * 0.3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        models.append(model)
    explicit, attached = models
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    (explicit(input_ids=tokens).logits.float().square().mean() + regularizer(explicit, Level.INNER)).backward()
    set_regularization(attached, (Level.INNER,), accumulation_steps=accumulation)
    for _ in range(accumulation):
        (attached(input_ids=tokens).logits.float().square().mean() / accumulation).backward()
    set_regularization(attached, ())
    for expected, got in zip(level_parameters(explicit, Level.INNER), level_parameters(attached, Level.INNER),
                             strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-7)
