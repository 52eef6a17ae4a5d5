"""The perturbed passes of one hypergradient share their dropout masks (issue 12, item 6).

A central difference (g(w + t u) - g(w - t u)) / 2t is a derivative only if both gradients
are of the same function; in train mode each pass used to draw its own dropout mask.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.config import RunConfig
from ds_bilevel.hypergrad import HYPERGRADS, BilevelConfig, Objective
from ds_bilevel.levels import Level, adapter_layers, level_parameters, regularizer
from ds_bilevel.losses import loss_sum
from ds_bilevel.reference import ReferenceBilevel
from ds_bilevel.schedule import Batch

N = 5


class MaskProblem:
    """A quadratic-ish problem whose every pass draws a dropout mask from torch's generator, as a
    model in train mode does; it records the masks of the inner-objective passes."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, generator=g)
        self.w, self.lam = torch.randn(N, generator=g), torch.randn(N, generator=g)
        self.offset = torch.zeros(N)
        self.inner_masks = []

    def gradients(self, objective):
        mask = (torch.rand(N) > 0.5).double() * 2.0  # inverted dropout, p = 0.5
        if objective is Objective.INNER:
            self.inner_masks.append(mask)
        w = (self.w + self.offset).requires_grad_()
        lam = self.lam.clone().requires_grad_()
        loss = (torch.exp(lam) * (mask * self.x * w).square()).sum() + (w * lam).sum() * 0.1
        grad_w, grad_lam = torch.autograd.grad(loss, [w, lam])
        return [grad_w], [grad_lam]

    def perturb_inner(self, direction, scale=0.0):
        self.offset = torch.zeros(N) if direction is None else scale * direction[0]

    def inner_learning_rate(self):
        return 0.1


@pytest.mark.parametrize("method", ["darts", "neumann", "cg"])
def test_every_perturbed_pass_of_a_hypergradient_sees_the_same_mask(method):
    torch.manual_seed(0)
    problem = MaskProblem()
    HYPERGRADS[method](problem, BilevelConfig(hypergrad=method, neumann_terms=2, cg_steps=2))
    assert len(problem.inner_masks) >= 2
    for mask in problem.inner_masks[1:]:
        assert torch.equal(mask, problem.inner_masks[0])


def test_the_random_stream_after_a_hypergradient_is_deterministic():
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        HYPERGRADS["cg"](MaskProblem(), BilevelConfig(hypergrad="cg", cg_steps=2))
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


# ---- numerically, on the reference with adapter dropout 0.1 --------------------------------

def tiny_reference(dropout: float) -> ReferenceBilevel:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         attn_implementation="eager"))  # SDPA has no double backward
    adapter = AdapterConfig(method="bidora", rank=2, alpha=4.0, dropout=dropout)
    inject_adapters(model, adapter)
    model.double()
    with torch.no_grad():  # B != 0: every gradient path is live
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)
    run = RunConfig(adapter=adapter, bilevel=BilevelConfig(hypergrad="darts", hypergrad_eps=1e-3))
    reference = ReferenceBilevel(model, run)
    g = torch.Generator().manual_seed(1)
    for objective in Objective:
        ids = torch.randint(0, 61, (2, 7), generator=g)
        reference.batches[objective] = Batch([{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                               "labels": ids}], labelled_tokens=12, tokens=14)
    return reference


def exact_mixed_product(reference: ReferenceBilevel, v, rng_state):
    """J v = d/dlam (grad_w L_tr . v) by double backward, with the dropout mask drawn from ``rng_state``."""
    model, batch = reference.model, reference.batches[Objective.INNER]
    inner, outer = level_parameters(model, Level.INNER), level_parameters(model, Level.OUTER)
    torch.set_rng_state(rng_state)
    model.train()
    (micro,) = batch.micro_batches
    logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits
    loss = loss_sum(logits, micro["labels"]) / batch.labelled_tokens
    reg = regularizer(model, Objective.INNER.level)
    grad_w = torch.autograd.grad(loss if reg is None else loss + reg, inner, create_graph=True)
    return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grad_w, v, strict=True)), outer)


def test_darts_mixed_product_matches_autograd_under_dropout():
    """With adapter dropout 0.1, darts' h = grad_lam L_val - J v equals the exact J v with the mask
    its passes drew. Measured: 8e-6 relative, as without dropout (the float32 cross-entropy of
    losses.py sets that floor); with each pass drawing its own mask, 25 (2500%)."""
    reference = tiny_reference(dropout=0.1)
    calls = []
    gradients = reference.gradients

    def spy(objective):
        calls.append((objective, torch.get_rng_state()))
        out = gradients(objective)
        calls[-1] += (out,)
        return out

    reference.gradients = spy
    torch.manual_seed(5)
    h = HYPERGRADS["darts"](reference, reference.bilevel)
    (v, grad_lam), inner_state = calls[0][2], calls[1][1]
    assert [c[0] for c in calls] == [Objective.OUTER, Objective.INNER, Objective.INNER]
    expected = [g - jv for g, jv in zip(grad_lam, exact_mixed_product(reference, v, inner_state), strict=True)]
    error = (torch.cat([(a - b).flatten() for a, b in zip(h, expected, strict=True)]).norm()
             / torch.cat([b.flatten() for b in expected]).norm())
    assert error < 1e-4
