"""Optional fused kernels (``use_liger_kernel``) and compilation (``torch_compile``).

``use_liger_kernel`` (the name HF Trainer uses) swaps a LLaMA-family model's RMSNorm, rotary
embedding and SwiGLU MLP for Liger Kernel's Triton kernels (``pip install ".[gpu]"``), on the
model instance, before the adapters are injected: Liger's SwiGLU calls the model's own
``gate_proj``/``up_proj``/``down_proj``, so the adapters that later wrap those projections still
run. Liger's fused linear cross-entropy is not taken through Liger's patched
``LlamaForCausalLM.forward``: it reads ``lm_head.weight`` outside the ``lm_head`` module, which
ZeRO-3 has not gathered there, and it only runs when labels are passed to the model, which the
engine does not do. Instead, as HF Trainer's ``use_liger_kernel`` does, the run's loss comes from
Liger's fused linear cross-entropy (``fused_linear_loss_fn``) called inside the output head's own
forward (loss_head.py), where ZeRO-3 has gathered the weight; ``linear_cross_entropy`` without
Liger uses the chunked ``losses.linear_token_loss_sum`` there instead (exact, any device).

``torch_compile`` compiles each decoder layer on its own (regional compilation: one graph
reused by every layer, compiled in seconds; DeepSpeed's ZeRO-3 hooks stay outside the
compiled regions, at the layer's submodules they break the graph).

Both need a CUDA device: Liger's kernels are Triton kernels, and ds_bilevel checks compiled
layers against the plain model only on a GPU. ``unsupported`` says why a setting cannot run
here; ``validation.check_kernels`` refuses before launch with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

# Liger's appliers for the causal-LM families ds_bilevel trains (models.py: LLaMA, Mistral, Qwen2
# names), by ``config.model_type``. Liger supports more; these are the ones tested here.
LIGER_APPLIERS = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
}
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True,
                 # the loss: ours (see the module docstring), never Liger's patched model forward
                 "cross_entropy": False, "fused_linear_cross_entropy": False}


def _cuda_device() -> str | None:
    """Why this process has no CUDA device for kernels, or None when it has one."""
    accelerator = os.environ.get("DS_ACCELERATOR", "")
    if accelerator and accelerator != "cuda":
        return f"DS_ACCELERATOR={accelerator} is not a CUDA device"
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    return None


def unsupported(setting: str, model_type: str | None = None) -> str | None:
    """Why ``setting`` (use_liger_kernel or torch_compile) cannot run here on a ``model_type``
    model (None: not known yet), or None when it can."""
    if setting == "use_liger_kernel":
        if model_type is not None and model_type not in LIGER_APPLIERS:
            return (f"Liger Kernel is applied to the {'/'.join(LIGER_APPLIERS)} families only, "
                    f"not to model_type {model_type!r}")
        no_device = _cuda_device()
        if no_device:
            return f"Liger Kernel's Triton kernels need a CUDA GPU ({no_device})"
        for module in ("liger_kernel", "triton"):
            if importlib.util.find_spec(module) is None:
                return f"{module.replace('_', '-')} is not installed (pip install \".[gpu]\")"
        return None
    if setting == "torch_compile":
        no_device = _cuda_device()
        return f"compiled layers are supported on a CUDA GPU only ({no_device})" if no_device else None
    raise ValueError(f"unknown kernel setting {setting!r}")


def apply_liger(model: torch.nn.Module) -> str:
    """Liger's RMSNorm, RoPE and SwiGLU on ``model`` (an instance, before adapters are injected);
    returns the applier's name. Raises ValueError for a family Liger is not applied to."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LIGER_APPLIERS:
        raise ValueError(f"use_liger_kernel: true for model_type {model_type!r}; allowed: the "
                         f"{', '.join(LIGER_APPLIERS)} families, or false")
    name = LIGER_APPLIERS[model_type]
    getattr(importlib.import_module("liger_kernel.transformers"), name)(model=model, **LIGER_KERNELS)
    return name


def fused_linear_loss_fn():
    """Liger's fused linear cross-entropy as ``fn(hidden (N, H), weight (V, H), targets (N,),
    bias) -> summed fp32 loss``, or None where Liger is not installed (then the caller uses
    ``losses.linear_token_loss_sum``)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from ds_bilevel.data import IGNORE_INDEX

    functional = importlib.import_module("liger_kernel.transformers.functional")

    def fn(hidden, weight, targets, bias=None):
        return functional.liger_fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index=IGNORE_INDEX,
                                                           reduction="sum")

    return fn


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"torch_compile: true, but {type(model).__name__} has no decoder layers at "
                         f"<base>.layers; allowed: false")
    return layers


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_kernels(model: torch.nn.Module, use_liger_kernel: bool, torch_compile: bool) -> dict:
    """What recipe.py calls right after ``load_model`` (before the adapters): the run's kernel
    settings applied, and a record of what was done for summary.json."""
    done = {}
    if use_liger_kernel:
        done["liger"] = apply_liger(model)
    if torch_compile:
        done["compiled_layers"] = compile_layers(model)
    return done
