"""The loss head (loss_head.py): in every supported family the model's forward returns the
head's summed loss unchanged as .logits, equal (value and every gradient) to the loss of the
model's logits; no (B, T, V) tensor is kept for backward; parameters, keys and ties unchanged;
unsupported models and settings refused. The run-level equality under ZeRO-3 on 2 ranks is a
row setting of the invariance matrix (tests/scripts/invariance.py, LINEAR_LOSS_STAGES)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import CAUSAL, VOCAB, causal_lm
from test_losses import saved_sizes

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.config import config_from_flat
from ds_bilevel.data import IGNORE_INDEX
from ds_bilevel.loss_head import SUPPORTED_MODEL_TYPES, LinearLossHead, install_loss_head, loss_head_of, unsupported
from ds_bilevel.losses import token_loss_sum
from ds_bilevel.preparation import prepare


def adapted(family: str) -> torch.nn.Module:
    model = causal_lm(family).float()
    inject_adapters(model, AdapterConfig(method="lora", rank=2, target_modules=["all-linear"]))
    with torch.no_grad():  # B != 0, so that the adapters change the logits and A gets a gradient
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def inputs(length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, length), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask, labels


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_the_head_returns_the_loss_of_the_logits(family):
    model = adapted(family)
    ids, mask, labels = inputs()
    expected, expected_grads = loss_and_grads(
        model, lambda: token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels))
    logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    keys = list(model.state_dict())
    original = model.get_output_embeddings()
    head = install_loss_head(model)
    assert loss_head_of(model) is head and head.weight is original.weight and head.bias is original.bias
    assert list(model.state_dict()) == keys  # exports and checkpoints see the same names

    def scored():
        with head.scoring(labels):
            return model(input_ids=ids, attention_mask=mask).logits

    value, grads = loss_and_grads(model, scored)
    assert value.shape == () and value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # not scoring (evaluation, export): the plain projection, and the labels were not kept
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=0)


def test_a_tied_head_stays_tied():
    model = adapted("gpt2")
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    head = install_loss_head(model)
    assert head.weight is embedding and model.get_output_embeddings() is head


def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    ids, mask, labels = inputs(length=40)  # more tokens than hidden units: the logits outsize the head's weight
    logits_path, head_path = adapted("llama"), adapted("llama")
    head = install_loss_head(head_path)
    vocab_rows = ids.numel() * VOCAB

    def keeps_logits(fn) -> bool:
        return max(n for _, n in saved_sizes(fn)) >= vocab_rows

    assert keeps_logits(lambda: token_loss_sum(logits_path(input_ids=ids, attention_mask=mask).logits, labels))

    def scored():
        with head.scoring(labels):
            return head_path(input_ids=ids, attention_mask=mask).logits

    assert not keeps_logits(scored)


def test_the_fused_kernel_gets_the_shifted_flat_batch():
    calls = []

    def fused(hidden, weight, targets, bias=None):  # stands in for Liger's kernel (kernels.fused_linear_loss_fn)
        calls.append((hidden.shape, targets.clone()))
        return F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=IGNORE_INDEX, reduction="sum")

    model = adapted("llama")
    ids, mask, labels = inputs()
    with torch.no_grad():
        expected = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    head = install_loss_head(model, fused)
    with torch.no_grad(), head.scoring(labels):
        value = model(input_ids=ids, attention_mask=mask).logits
    (shape, targets), = calls
    assert shape == (ids.numel(), model.config.hidden_size)
    assert targets.tolist() == torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1).flatten().tolist()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-5)


def test_unsupported_models_and_settings_are_refused():
    assert all(unsupported(t) is None for t in SUPPORTED_MODEL_TYPES)
    assert "gemma2" in unsupported("gemma2") and "llama" in unsupported("gemma2")
    assert "adapter target" in unsupported("llama", ["q_proj", "lm_head"])
    assert unsupported("llama", "all-linear") is None
    model = causal_lm("llama")
    model.config.model_type = "gemma2"  # as if its forward soft-capped the logits
    with pytest.raises(ValueError, match=r"^linear_cross_entropy: true, but .*'gemma2'; allowed: false$"):
        install_loss_head(model)
    model = causal_lm("llama")
    inject_adapters(model, AdapterConfig(method="lora", rank=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        install_loss_head(model)
    assert isinstance(install_loss_head(causal_lm("llama")), LinearLossHead)


RUN = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 8, "data.eval_size": 4}


@pytest.mark.parametrize("setting, installed", [({}, False), ({"linear_cross_entropy": True}, True)])
def test_prepare_installs_the_head_only_when_asked(setting, installed):
    run = config_from_flat({**RUN, **setting})
    model = prepare(run).model
    assert (loss_head_of(model) is not None) == installed
    if installed:  # the plain model's parameters, in the same order, with the same values
        plain = prepare(config_from_flat({**RUN, "linear_cross_entropy": False})).model
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))
