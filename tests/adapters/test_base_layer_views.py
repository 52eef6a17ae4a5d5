"""An adapter layer shows its base layer's weight and bias (read-only, as PEFT's tuner layers do):
T5's feed-forward reads wo.weight.dtype itself, and failed with an AttributeError when wo was
adapted. The views register nothing: the model's parameters and state dict are the same as
without them, and T5's block with wo adapted computes what the merged block computes."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerFF
from transformers.pytorch_utils import Conv1D

from ds_bilevel.adapters import METHODS, AdapterConfig, AdapterLayer, inject_adapters
from ds_bilevel.adapters.inject import named_base_parameters
from ds_bilevel.levels import Level, adapter_layers, named_level_parameters


@pytest.mark.parametrize("base", [nn.Linear(6, 5), nn.Linear(6, 5, bias=False), Conv1D(5, 6)],
                         ids=["linear", "linear-no-bias", "conv1d"])
def test_weight_and_bias_are_the_base_layers_own(method, adapter_config, base):
    layer = METHODS[method].layer.from_config(base, adapter_config(method))
    assert layer.weight is base.weight  # as stored: a Conv1D's (in, out), as PEFT's layer gives it
    assert layer.bias is base.bias  # None for the bias-free Linear
    with pytest.raises(AttributeError):  # read-only: nothing replaces the base's tensor through the view
        layer.weight = torch.zeros_like(base.weight)
    with pytest.raises(KeyError, match="already exists"):  # nor registers a second weight (tie_weights' way)
        layer.weight = nn.Parameter(torch.zeros_like(base.weight))
    assert "weight" not in layer._parameters and "bias" not in layer._parameters


def model_tensors(model: nn.Module) -> dict[str, list]:
    """What names the model's tensors: state dict, parameters (frozen or not), buffers, each level
    (the adapter files), the base's own names (the merged export), and the parameters DeepSpeed
    partitions and hooks (module.parameters(recurse=False) of every module)."""
    return {"state_dict": list(model.state_dict()), "parameters": [n for n, _ in model.named_parameters()],
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "buffers": [n for n, _ in model.named_buffers()],
            **{f"level {level.value}": [n for n, _ in named_level_parameters(model, level)] for level in Level},
            "base": [n for n, _ in named_base_parameters(model)],
            "per module": [(n, len(list(m.parameters(recurse=False)))) for n, m in model.named_modules()]}


def tiny_t5() -> transformers.T5ForSequenceClassification:
    torch.manual_seed(0)
    return transformers.T5ForSequenceClassification(transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, num_labels=2))


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=4,
                                                                n_positions=16))


@pytest.mark.parametrize("family", ["llama", "t5", "gpt2"])
def test_the_views_register_nothing(method, make_llama, family, monkeypatch):
    """Each method at all-linear (T5's wo, GPT-2's Conv1D layers included): every name the model's
    tensors go by is the same as with the two properties deleted from AdapterLayer (the code
    before them)."""
    build = {"llama": make_llama, "t5": tiny_t5, "gpt2": tiny_gpt2}[family]
    config = AdapterConfig(method=method, rank=4, alpha=8.0, aux_rank=3, target_modules=["all-linear"])

    def injected() -> nn.Module:
        model = build()
        inject_adapters(model, config, exclude=("classification_head",) if family == "t5" else ())
        return model

    with_views = injected()
    assert any(name.endswith(".wo") for name, _ in adapter_layers(with_views)) or family != "t5"
    monkeypatch.delattr(AdapterLayer, "weight")
    monkeypatch.delattr(AdapterLayer, "bias")
    without = injected()
    assert not hasattr(adapter_layers(without)[0][1], "weight")  # the properties really are gone
    assert model_tensors(with_views) == model_tensors(without)


def t5_feed_forward(gated: bool, dtype: torch.dtype) -> T5LayerFF:
    """T5's feed-forward sublayer (norm, T5DenseActDense or T5DenseGatedActDense, residual)."""
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=16, d_ff=32, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu" if gated else "relu")
    return T5LayerFF(config).to(dtype).eval()


def adapt_wo(block: T5LayerFF, method: str) -> AdapterLayer:
    inject_adapters(block, AdapterConfig(method=method, rank=4, alpha=8.0, aux_rank=3, target_modules=["wo"]))
    return block.DenseReluDense.wo


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_t5_feed_forward_with_wo_adapted_is_the_base_at_init(method, gated, dtype):
    """At init (LoRA's B = 0, DoRA's magnitude = ||W0||) the adapted block is the plain block, in
    fp32 and on a bf16 base; before the views its forward raised AttributeError at wo.weight."""
    plain = t5_feed_forward(gated, dtype)
    adapted = copy.deepcopy(plain)
    adapt_wo(adapted, method)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        expected, actual = plain(x), adapted(x)
    assert actual.dtype == dtype
    # Measured exact (B = 0 adds zeros; DoRA's m / ||W0|| is 1); a bound of one rounding each, as
    # DoRA's rescaling is 1 only up to rounding.
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert (actual - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-gelu"])
def test_t5_feed_forward_with_wo_adapted_equals_the_merged_block(method, gated, randomize, zero_auxiliary,
                                                                 max_rel_err):
    """Random adapters (dW != 0): the adapted block equals the plain block holding wo's merged weight."""
    adapted = t5_feed_forward(gated, torch.float32)
    wo = adapt_wo(adapted, method)
    randomize(adapted)
    zero_auxiliary(adapted)  # Bi-LoRA merges without its auxiliary module
    merged = t5_feed_forward(gated, torch.float32)
    with torch.no_grad():
        merged.DenseReluDense.wo.weight.copy_(wo.merged_weight())
    assert (merged.DenseReluDense.wo.weight - wo.base_layer.weight).abs().max() > 1e-3  # wo really moved
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_rel_err(adapted(x), merged(x)) < 1e-5


def test_t5_wo_kept_in_fp32_under_a_bf16_block():
    """T5 loads with wo kept in fp32 in a bf16 model (T5's _keep_in_fp32_modules): its forward casts
    the bf16 activations to wo.weight's dtype, which the adapter layer now gives (fp32), and the
    adapted block is the plain one at init."""
    plain = t5_feed_forward(gated=True, dtype=torch.bfloat16)
    plain.DenseReluDense.wo.float()
    adapted = copy.deepcopy(plain)
    wo = adapt_wo(adapted, "lora")
    assert wo.weight.dtype == wo.lora_A.dtype == torch.float32
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(adapted(x), plain(x))
