"""Precision choices that are allowed but doubtful, said before launch (validation.warn_once).

bf16 on a CPU without bf16 arithmetic is correct but emulated (slow); a second-order
hypergradient under bf16 differences two bf16 gradients (docs/methods.md, issue 12 item 7).
"""

from __future__ import annotations

import torch

from ds_bilevel.adapters.registry import METHODS
from ds_bilevel.ds_config import DeepSpeedSettings
from ds_bilevel.levels import TrainingMode


def bf16_second_order_warning(hypergrad: str, method: str, ds_config: dict) -> str | None:
    """A bi-level run whose second-order hypergradient differences two bf16 gradients: allowed,
    but its second-order term is mostly rounding (issue 12 item 7, docs/methods.md): one builtin:
    mid-llama block computed in bf16 put J.v 46% off the fp32 product at the default radius."""
    if (not DeepSpeedSettings.read(ds_config).bf16 or hypergrad == "first_order"
            or METHODS[method].training_mode is not TrainingMode.BILEVEL):
        return None
    return (f"bilevel.hypergrad {hypergrad} with bf16.enabled = true: its second-order term differences two bf16 "
            f"gradients and is mostly rounding (J.v measured 46% off fp32 on one mid-llama block); use a DeepSpeed "
            f"config without bf16 where that term matters, or bilevel.hypergrad first_order (docs/methods.md)")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16/AMX, through oneDNN).
    Without it PyTorch emulates them: measured 0.94 against 116 GFLOP/s in fp32 (1024^2 matmul,
    2-core AMD EPYC with AVX2 only), which made the bf16 CPU demo 8.6x slower than in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        return False


def emulated_bf16_warning(ds_config: dict) -> str | None:
    """A bf16 run on CPU ranks whose CPU has no bf16 arithmetic: correct, but slow."""
    if not DeepSpeedSettings.read(ds_config).bf16 or torch.cuda.is_available() or cpu_has_native_bf16():
        return None
    return ("bf16.enabled = true on a CPU without bf16 arithmetic (no AVX512-BF16/AMX): matrix products are "
            "emulated, about 100x slower than fp32 here; for speed use a config without bf16 "
            "(ds_configs/cpu_zero2.json, cpu_zero3.json)")
