"""Helpers that tests import to compare tensors and to give adapters random values (one copy each;
the adapter tests' fixtures ``randomize`` and ``max_rel_err`` hand these out)."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| over the whole tensor."""
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e||, Frobenius norms."""
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.1, zero_auxiliary: bool = False) -> None:
    """Give every adapter parameter random values, so that dW != 0 and every gradient path is live.

    The DoRA/BiDoRA magnitude stays near ||W0||_row (a relative jitter); BiLoRA's raw lambda gets
    unit-scale noise so that the softmax/sigmoid are far from uniform; the other factors std-scale
    noise. With ``zero_auxiliary`` Bi-LoRA's auxiliary module is zero, as at inference. Levels come
    from each layer's ``level_parameters`` (never from matching names)."""
    from ds_bilevel.levels import Level, adapter_layers

    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for level in Level:
            for name, param in layer.level_parameters(level):
                noise = torch.randn(param.shape, generator=gen).to(param.dtype)
                if name == "magnitude":
                    param.mul_(1 + 0.1 * noise)
                elif name == "lambda_raw":
                    param.copy_(noise)
                else:
                    param.copy_(std * noise)
        if zero_auxiliary and hasattr(layer, "aux_B"):
            layer.aux_B.zero_()
