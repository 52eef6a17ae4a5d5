"""Read a DeepSpeed JSON config and fill its "auto" values from the run's settings (as HF does)."""

from __future__ import annotations

import json
from pathlib import Path

from ds_bilevel.config import RunConfig

# The features the engine builds itself: a config that sets them would fight it.
FORBIDDEN_SECTIONS = ("optimizer", "scheduler")


def read_ds_config(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"ds_config: {path} is not valid JSON ({error})") from None


def fill_ds_config(ds_config: dict, run: RunConfig, world_size: int) -> dict:
    """A copy of ``ds_config`` with "auto" replaced; concrete values must agree with the run."""
    filled = json.loads(json.dumps(ds_config))
    for section in FORBIDDEN_SECTIONS:
        if section in filled:
            raise ValueError(f"ds_config: remove the {section!r} section; ds_bilevel builds the level-aware "
                             f"optimizer and schedules from the run settings (learning_rate, lr_scheduler)")
    wanted = {
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "train_batch_size": run.global_batch_size(world_size),
        "gradient_clipping": run.max_grad_norm,
    }
    for key, value in wanted.items():
        given = filled.get(key, "auto")
        if given == "auto":
            filled[key] = value
        elif given != value:
            origin = (f" (micro_batch_size {run.micro_batch_size} x gradient_accumulation_steps "
                      f"{run.gradient_accumulation_steps} x {world_size} rank(s))" if key == "train_batch_size" else "")
            raise ValueError(f"ds_config: {key} = {given} disagrees with the run's value {value}{origin}; "
                             f"set it to \"auto\" or make them equal")
    stage = filled.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ds_config: zero_optimization.stage = {stage!r}; allowed: 0, 1, 2, 3")
    if filled.get("fp16", {}).get("enabled") and filled.get("bf16", {}).get("enabled"):
        raise ValueError("ds_config: fp16 and bf16 are both enabled; enable one")
    for monitor in ("tensorboard", "csv_monitor"):
        section = filled.get(monitor)
        if isinstance(section, dict) and section.get("output_path", "auto") == "auto":
            section["output_path"] = str(Path(run.output_dir) / "monitor")
    # The client optimizer is a torch AdamW: DeepSpeed must be told it may use it with ZeRO.
    filled["zero_allow_untested_optimizer"] = True
    return filled


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
