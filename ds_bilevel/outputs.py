"""What a run measures and writes: adapter values by level, the finiteness guard, how far each
level moved, the frozen base's checksum, peak memory per rank, the adapter file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ds_bilevel.adapters.inject import named_base_parameters
from ds_bilevel.levels import Level, named_level_parameters
from ds_bilevel.zero_access import gathered, master_value


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or the adapters hold
    a non-finite value at a save."""


def base_checksum(model: torch.nn.Module) -> str:
    """sha256 over the frozen base's names and bytes, gathered one tensor at a time."""
    digest = hashlib.sha256()
    for name, param in named_base_parameters(model):
        with gathered([param]):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_memory_per_rank() -> list[float]:
    """Each rank's peak memory in GiB: accelerator memory allocated on a GPU, else the process's
    peak resident set (ru_maxrss). Collective."""
    import resource

    import deepspeed.comm as dist

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        peak, device = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, torch.device("cpu")  # KiB
    values = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([peak], dtype=torch.float64, device=device))
    return [round(v.item(), 3) for v in values]


def on_host(value):
    """A device scalar as a Python float (a host sync); anything else as it is."""
    return float(value) if isinstance(value, torch.Tensor) else value


def level_values(module: torch.nn.Module) -> dict[Level, dict[str, torch.Tensor]]:
    """The fp32 master value of every adapter parameter, by level, on the host (collective)."""
    return {level: {name: master_value(p).cpu() for name, p in named_level_parameters(module, level)}
            for level in Level}


def check_finite(values: dict[Level, dict[str, torch.Tensor]]) -> dict[Level, dict[str, torch.Tensor]]:
    """Refuse to save non-finite weights (the optimizer never writes them; this is the guard)."""
    bad = [name for by_name in values.values() for name, tensor in by_name.items()
           if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"adapter weights {bad[:3]} hold non-finite values; nothing was saved")
    return values


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all tensors of ``before`` (0 for none). A level that
    starts at zero (BiLoRA's P and lambda, LoRA's B) has no scale of its own: the change is then
    taken relative to where it ended, 1.0 when it moved at all, 0.0 when it did not (dividing by
    a tiny floor reported 2.3e11 there, issue 18). ``change_norm`` gives the absolute size."""
    if not before:
        return 0.0
    start = torch.cat([t.flatten() for t in before.values()])
    end = torch.cat([after[name].flatten() for name in before])
    scale = start.norm() if start.norm() > 0 else end.norm()
    return ((end - start).norm() / scale).item() if scale > 0 else 0.0


def change_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """||after - before|| over all tensors of ``before`` (0 for none)."""
    if not before:
        return 0.0
    return torch.cat([(after[name] - t).flatten() for name, t in before.items()]).norm().item()


def write_adapters(path: Path, values: dict[Level, dict[str, torch.Tensor]], method: str,
                   builtin_drawn_on: str | None = None) -> None:
    """adapter_model.safetensors: every adapter tensor by qualified name, the method and each
    tensor's level in the metadata, and for a builtin base the device type its values were drawn
    on (builtin.model.draw_device_type: the export rebuilds it there)."""
    from safetensors.torch import save_file

    tensors = {name: value for by_name in values.values() for name, value in by_name.items()}
    levels = {name: level.value for level, by_name in values.items() for name in by_name}
    metadata = {"method": method, "levels": json.dumps(levels)}
    if builtin_drawn_on is not None:
        metadata["builtin_drawn_on"] = builtin_drawn_on
    save_file(tensors, str(path), metadata=metadata)


def trim_metrics(path: Path, last_step: int, *, at_the_end: bool = False) -> int:
    """Keep the metrics.jsonl lines of steps up to ``last_step`` (a resumed checkpoint's step), in
    order; drop the later ones, which the resumed launch writes again, and a line cut short by a
    killed run. ``at_the_end``: the checkpoint is the run's last step, so the resumed launch only
    evaluates again: its final evaluation row (step ``last_step``) goes too, not to be there twice.
    Rewritten atomically; returns how many lines were dropped (0 without a file)."""
    import os

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        final_eval = at_the_end and isinstance(row, dict) and row.get("step") == last_step and "eval_loss" in row
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step and not final_eval:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)
    return dropped
