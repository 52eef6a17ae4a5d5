"""ds_bilevel/kernels.py without a GPU: Liger is replaced by a fake module that records what it is
asked to do (the real one needs Triton and CUDA), and torch.compile by a recorder."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers
from families import SMALL, VOCAB
from families import causal_lm as family_lm

from ds_bilevel import kernels
from ds_bilevel.data import IGNORE_INDEX
from ds_bilevel.losses import linear_token_loss_sum, shifted_targets


def causal_lm(family: str) -> torch.nn.Module:
    """tests/families.py's tiny model, or a tiny Mistral/Qwen2 (not among its families)."""
    named = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    if family not in named:
        return family_lm(family)
    config_cls, model_cls = named[family]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, num_key_value_heads=2, **SMALL)
    return getattr(transformers, model_cls)(config)


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []

    def applier(name):
        def apply(**kwargs):
            calls.append((name, kwargs))
            model = kwargs["model"]
            for layer in model.model.layers:  # what Liger does to an instance: patch the modules' forwards
                layer.mlp.liger = name
        return apply

    transformers_mod = types.ModuleType("liger_kernel.transformers")
    for name in ("apply_liger_kernel_to_llama", "apply_liger_kernel_to_mistral", "apply_liger_kernel_to_qwen2",
                 "apply_liger_kernel_to_phi3", "apply_liger_kernel_to_gemma"):
        setattr(transformers_mod, name, applier(name))
    functional = types.ModuleType("liger_kernel.transformers.functional")

    def liger_fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean"):
        calls.append(("liger_fused_linear_cross_entropy", {"ignore_index": ignore_index, "reduction": reduction}))
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    package = types.ModuleType("liger_kernel")
    package.__spec__ = types.SimpleNamespace(name="liger_kernel")
    package.transformers = transformers_mod
    transformers_mod.functional = functional
    for name, module in (("liger_kernel", package), ("liger_kernel.transformers", transformers_mod),
                         ("liger_kernel.transformers.functional", functional)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize(("family", "applier"), [("llama", "apply_liger_kernel_to_llama"),
                                                 ("mistral", "apply_liger_kernel_to_mistral"),
                                                 ("qwen2", "apply_liger_kernel_to_qwen2")])
def test_liger_applied_to_the_llama_families(fake_liger, family, applier):
    model = causal_lm(family)
    done = kernels.apply_kernels(model, use_liger_kernel=True, torch_compile=False)
    assert done == {"liger": applier}
    assert fake_liger == [(applier, {"model": model, "rope": True, "rms_norm": True, "swiglu": True,
                                     "cross_entropy": False, "fused_linear_cross_entropy": False})]
    assert all(layer.mlp.liger == applier for layer in model.model.layers)


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_liger_refuses_other_families(fake_liger, family):
    with pytest.raises(ValueError, match=r"use_liger_kernel: true for model_type '\w+'; allowed: the llama, "
                                         r"mistral, qwen2 families, or false"):
        kernels.apply_kernels(causal_lm(family), use_liger_kernel=True, torch_compile=False)
    assert fake_liger == []
    assert kernels.unsupported("use_liger_kernel", family).startswith("Liger Kernel is applied to the llama/")


def test_nothing_applied_by_default(fake_liger, monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: pytest.fail("compiled"))
    assert kernels.apply_kernels(causal_lm("llama"), use_liger_kernel=False, torch_compile=False) == {}
    assert fake_liger == []


def test_torch_compile_compiles_each_decoder_layer(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    model = causal_lm("llama")
    assert kernels.apply_kernels(model, use_liger_kernel=False, torch_compile=True) == {"compiled_layers": 2}
    assert compiled == list(model.model.layers)


def test_support_on_this_machine(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert "DS_ACCELERATOR=cpu is not a CUDA device" in kernels.unsupported("use_liger_kernel", "llama")
    assert "DS_ACCELERATOR=cpu is not a CUDA device" in kernels.unsupported("torch_compile")
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.unsupported("torch_compile") == "compiled layers are supported on a CUDA GPU only " \
                                                   "(this machine has no CUDA GPU)"


def test_fused_linear_loss_fn_is_the_same_sum(fake_liger):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    labels[0, :3] = IGNORE_INDEX
    fn = kernels.fused_linear_loss_fn()
    value = fn(hidden.flatten(0, 1), weight, shifted_targets(labels))
    assert fake_liger[-1] == ("liger_fused_linear_cross_entropy", {"ignore_index": IGNORE_INDEX, "reduction": "sum"})
    torch.testing.assert_close(value, linear_token_loss_sum(hidden, weight, labels), rtol=2e-6, atol=1e-5)
