"""Adapters start from the same values whatever the run's precision (issue 12's bf16 rows)."""

import pytest
import torch

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.levels import Level, named_level_parameters


@pytest.mark.parametrize("method", ["lora", "bilora", "bilora_sam"])
def test_bf16_adapters_start_at_the_fp32_values_rounded(method):
    """The same seed gives the fp32 run's initial adapter values, rounded to bf16, in a bf16 model
    (before the fix torch's bf16 uniform_ drew other numbers: k_proj's A was up to 0.25 off)."""
    initial = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_builtin_model("builtin:micro-llama", 96, seed=0, dtype=dtype)
        torch.manual_seed(3)
        inject_adapters(model, AdapterConfig(method=method, rank=4, aux_rank=2))
        initial[dtype] = {n: p.detach().clone() for level in Level for n, p in named_level_parameters(model, level)}
    for name, value in initial[torch.float32].items():
        assert torch.equal(initial[torch.bfloat16][name], value.to(torch.bfloat16)), name
