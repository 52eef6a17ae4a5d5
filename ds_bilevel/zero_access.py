"""Read and write trained parameters and their gradients at any ZeRO stage, between backward and step.

Also ``gathered``: the whole value of ZeRO-3 partitioned parameters for the length of a block
(a base weight read outside the forward). Everything goes through DeepSpeed's supported
accessors (``deepspeed.utils.safe_*``) where they exist. Full tensors are returned on every
rank; the reads are collectives under ZeRO, so every rank must call them for the same
parameters in the same order.

Two copies of a trained parameter exist under mixed precision: the fp32 *master* held by
the optimizer and the *compute* weight (bf16) the forward uses. Perturbing the compute
weight from the master and restoring it from the master leaves the master untouched, so a
restore is exact at every stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned ``params`` for the block (a no-op for ordinary tensors).

    Must be entered on every rank at once. Gathers only what it is given: callers
    pass one layer at a time so that the whole model is never materialised.
    """
    if any(is_zero3_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


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
    write_compute_weights([param], [value])


@torch.no_grad()
def scale_masters_(params: list[nn.Parameter], factor: torch.Tensor | float) -> None:
    """Multiply this rank's share of each fp32 master by ``factor``: no communication. Where
    there is no separate master (fp32 without ZeRO), the compute weight is the master: the
    caller scales it. The ZeRO-1/2 shares (views of the flat partition) in one multi-tensor op:
    on a GPU one kernel for all of them instead of one per parameter."""
    fragments = []
    for param in params:
        if hasattr(param, "ds_id"):
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param)
            safe_set_local_fp32_param(param, master * _on(factor, master))
        elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16: a view of the flat partition
            fragments.append(param._hp_mapping.get_hp_fragment())
    _foreach_scale_(fragments, factor)


def _foreach_scale_(tensors: list[torch.Tensor], factor: torch.Tensor | float) -> None:
    """``t.mul_(factor)`` for every tensor, one multi-tensor op per device (an offloaded master
    is on the host, the factor may be on the accelerator)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for group in by_device.values():
        torch._foreach_mul_(group, _on(factor, group[0]))


def _on(factor: torch.Tensor | float, tensor: torch.Tensor) -> torch.Tensor | float:
    """``factor`` where ``tensor`` lives (an offloaded master is on the host)."""
    return factor.to(tensor.device) if isinstance(factor, torch.Tensor) else factor


def _gathered_now(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter whose full value is present on this rank: a *persistent* parameter
    (fewer elements than stage3_param_persistence_threshold, default 1e5: every adapter
    factor of a LLaMA layer at r=16) stays gathered between forwards, and the forward reads
    ``param.data``, not the partition. DeepSpeed refreshes it from the partitions only
    after an optimizer step."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE and param.data.numel() == param.ds_numel


@torch.no_grad()
def write_compute_weights(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Write each ``value`` (full, fp32) into the weight the forward uses, cast to its dtype.

    Under ZeRO-3 that is this rank's partition ``param.ds_tensor`` (the last one padded),
    and the gathered copy too where the parameter is persistent: writing the partition alone
    left persistent weights unperturbed, which made darts/neumann/cg first-order at ZeRO-3
    on more than one rank (issue 12). The other parameters' whole weights take one
    multi-tensor copy (a hypergradient writes every inner parameter 3 times per step).
    """
    whole, sources = [], []
    for param, value in zip(params, values, strict=True):
        if hasattr(param, "ds_id"):
            param.ds_tensor.copy_(local_partition(param, value).to(param.ds_tensor.device))
            if _gathered_now(param):
                param.data.copy_(value.view(param.ds_shape))
        else:
            whole.append(param.data)
            sources.append(value.view_as(param))
    if whole:
        torch._foreach_copy_(whole, sources)


@torch.no_grad()
def scale_compute_weights_(params: list[nn.Parameter], factor: torch.Tensor | float) -> None:
    """Multiply the weights the forward uses by ``factor`` in place, no communication: under
    ZeRO-3 each rank's partition and, for a persistent parameter, its gathered copy."""
    tensors = []
    for param in params:
        if hasattr(param, "ds_id"):
            tensors.append(param.ds_tensor)
            if _gathered_now(param):
                tensors.append(param.data)
        else:
            tensors.append(param.data)
    _foreach_scale_(tensors, factor)


def full_grad(param: nn.Parameter) -> torch.Tensor:
    """The full gradient reduced over ranks, fp32 (zeros when none was produced)."""
    from deepspeed.utils import safe_get_full_grad

    grad = safe_get_full_grad(param)
    shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
    return torch.zeros(shape, device=param.device) if grad is None else grad.float().reshape(shape).clone()


def _batchable(param: nn.Parameter) -> bool:
    """ZeRO-1/2 (and bf16 without ZeRO): a fragment of the flat fp32 partition per rank, put back
    together by an all-reduce of zero-padded copies (DeepSpeed's get_full_hp_grad/param)."""
    return hasattr(param, "_hp_mapping") and not hasattr(param, "ds_id") and (
        getattr(param, "_hp_grad", None) is not None or param.grad is None)


def _fragment(param: nn.Parameter, kind: str) -> tuple[int, torch.Tensor] | None:
    """(offset in the flattened parameter, this rank's fp32 fragment) of its gradient or master."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    if kind == "master":
        return address.start, mapping.get_hp_fragment().flatten()
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()  # cast by the copy
    if fragment.numel() == param.numel():  # bf16 keeps a full accumulation buffer: take the owned part
        fragment = fragment.narrow(0, address.start, address.numel)
    return address.start, fragment


def _full_values(params: list[nn.Parameter], kind: str, one: Callable) -> list[torch.Tensor]:
    """``one(param)`` for each parameter, except that the ZeRO-1/2 ones are put back together with
    a single all-reduce over one flat buffer instead of one all-reduce each (the hypergradient
    reads every adapter parameter several times per step: per-parameter collectives made a
    bi-level step cost up to twice its passes, docs/benchmarks.md)."""
    import deepspeed.comm as dist

    batched = [i for i, p in enumerate(params) if _batchable(p)]
    out = [None if i in set(batched) else one(p) for i, p in enumerate(params)]
    if batched:
        members = [params[i] for i in batched]
        offsets = [0]
        for param in members:
            offsets.append(offsets[-1] + param.numel())
        buffer = torch.zeros(offsets[-1], dtype=torch.float32, device=members[0].device)
        targets, fragments = [], []
        for param, offset in zip(members, offsets, strict=False):
            fragment = _fragment(param, kind)
            if fragment is not None:
                start, values = fragment
                targets.append(buffer.narrow(0, offset + start, values.numel()))
                fragments.append(values)
        if targets:  # one multi-tensor copy (and cast from bf16) for all of them
            torch._foreach_copy_(targets, fragments)
        dist.all_reduce(buffer, group=members[0]._dp_group)
        # Views of the one buffer, not copies: the callers (hypergrad, engine) only read them.
        for i, param, offset in zip(batched, members, offsets, strict=False):
            out[i] = buffer.narrow(0, offset, param.numel()).view(param.shape)
    return out


def full_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """``full_grad`` of every parameter, with one collective for all ZeRO-1/2 ones."""
    return _full_values(params, "grad", full_grad)


def master_values(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """``master_value`` of every parameter, with one collective for all ZeRO-1/2 ones."""
    return _full_values(params, "master", master_value)


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
