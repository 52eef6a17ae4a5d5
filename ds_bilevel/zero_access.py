"""Read and write trained parameters and their gradients at any ZeRO stage, between backward and step.

Everything goes through DeepSpeed's supported accessors (``deepspeed.utils.safe_*``) where
they exist. Full tensors are returned on every rank; the reads are collectives under ZeRO,
so every rank must call them for the same parameters in the same order.

Two copies of a trained parameter exist under mixed precision: the fp32 *master* held by
the optimizer and the *compute* weight (bf16) the forward uses. Perturbing the compute
weight from the master and restoring it from the master leaves the master untouched, so a
restore is exact at every stage.
"""

from __future__ import annotations

import torch
from torch import nn


def master_value(param: nn.Parameter) -> torch.Tensor:
    """The full fp32 master value (the parameter itself when there is no separate master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return (value if value is not None else param.detach()).float().clone()


def set_master_value(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the fp32 master and the compute weight to ``value``."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value)
    write_compute_weight(param, value)


@torch.no_grad()
def scale_master_(param: nn.Parameter, factor: float) -> None:
    """Multiply this rank's share of the fp32 master by ``factor``: no communication. Where
    there is no separate master (fp32 without ZeRO), the compute weight is the master: the
    caller scales it."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param) * factor)
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16: a view of the flat partition
        param._hp_mapping.get_hp_fragment().mul_(factor)


@torch.no_grad()
def write_compute_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write ``value`` (full, fp32) into the weight the forward uses, cast to its dtype.

    Under ZeRO-3 that is this rank's partition ``param.ds_tensor`` (the last one padded).
    """
    if hasattr(param, "ds_id"):
        param.ds_tensor.copy_(local_partition(param, value).to(param.ds_tensor.device))
    else:
        param.data.copy_(value.view_as(param))


def full_grad(param: nn.Parameter) -> torch.Tensor:
    """The full gradient reduced over ranks, fp32 (zeros when none was produced)."""
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
    return torch.zeros(shape, device=param.device) if grad is None else grad.float().reshape(shape).clone()


def set_grad(param: nn.Parameter, value: torch.Tensor) -> None:
    """Replace the (reduced) gradient the next optimizer step will use.

    Under ZeRO-3 through the *local* setter with this rank's partition: with optimizer
    offload, DeepSpeed computes the clipping norm from per-partition norms recorded during
    backward, and only the local setter records the new value's norm (DeepSpeed 0.19.8).
    """
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    value = value.to(torch.float32)
    if hasattr(param, "ds_id"):
        safe_set_local_grad(param, local_partition(param, value))
    else:
        safe_set_full_grad(param, value)


def local_partition(param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full tensor: flat, zero-padded like ``param.ds_tensor``."""
    import deepspeed.comm as dist

    size = param.ds_tensor.numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    flat = value.flatten()[start:start + size]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())]) if flat.numel() < size else flat
