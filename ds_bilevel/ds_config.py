"""Read a DeepSpeed JSON config, take its concrete values, and fill its "auto" values from the
run's settings (as HF does).

Precedence, for the settings a DeepSpeed config can also hold (micro batch, accumulation, the
global batch, clipping): command-line flag > YAML config file > preset (--preset) > the DeepSpeed
JSON's concrete value > the project default. A value given both as a flag or in the YAML and in
the JSON must be the same number; otherwise the run is refused with one line naming both. A
preset's value replaces the JSON's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_bilevel.config import RunConfig

# The features the engine builds itself: a config that sets them would fight it.
# section -> (why, the settings that do its job instead).
FORBIDDEN_SECTIONS = {
    "optimizer": ("ds_bilevel builds its own level-aware AdamW, one param group per level stepped separately",
                  "--learning_rate, --weight_decay, --bilevel.outer_learning_rate, --bilevel.outer_weight_decay"),
    "scheduler": ("ds_bilevel schedules each level's learning rate on that level's own steps",
                  "--lr_scheduler (linear, cosine, constant), --warmup_ratio"),
}
# DeepSpeed key -> the run setting it stands for (train_batch_size: their product with the world size).
DS_SETTINGS = {"train_micro_batch_size_per_gpu": "micro_batch_size",
               "gradient_accumulation_steps": "gradient_accumulation_steps",
               "gradient_clipping": "max_grad_norm"}
FP16_REASON = ("fp16 is not supported: its dynamic loss scale multiplies the gradients that ds_bilevel "
               "reads, replaces and combines across passes (hypergradients, Bi-LoRA's ascent, the skip of "
               "non-finite steps) by a factor that changes between passes; allowed: bf16 (\"bf16\": "
               "{\"enabled\": true}: fp32 masters, no loss scaling) or fp32 (both off)")


def check_sections(ds_config: dict) -> None:
    for section, (why, flags) in FORBIDDEN_SECTIONS.items():
        if section in ds_config:
            raise ValueError(f"ds_config: the {section!r} section is not supported ({why}); remove it and set "
                             f"{flags} instead")
    fp16 = ds_config.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, "auto"):
        raise ValueError(f"ds_config: fp16.enabled = {json.dumps(fp16.get('enabled'))}; {FP16_REASON}")


def _given(run: RunConfig, setting: str) -> str | None:
    """Where ``setting`` was given (flag, YAML), or None when it holds its default."""
    if run.sources is None:  # built in code: every value is meant
        return "the run's settings"
    return run.sources.get(setting)


def _from_preset(run: RunConfig, setting: str) -> bool:
    """Whether ``setting`` holds a preset's value (which the DeepSpeed JSON's does not override)."""
    return (run.sources or {}).get(setting, "").startswith("the preset ")


def _concrete(ds_config: dict, key: str, integer: bool):
    """The JSON's value of ``key``, None for "auto" or absent; refuses a value of the wrong type."""
    value = ds_config.get(key, "auto")
    if value == "auto":
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if integer and not (number and value == int(value) and value >= 1):
        raise ValueError(f"ds_config: {key} = {json.dumps(value)}; allowed: an integer >= 1 or \"auto\"")
    if not integer and not (number and value >= 0):
        raise ValueError(f"ds_config: {key} = {json.dumps(value)}; allowed: a number >= 0 or \"auto\"")
    return int(value) if integer else float(value)


def settings_from_ds_config(ds_config: dict, run: RunConfig, world_size: int) -> RunConfig:
    """A copy of ``run`` that takes the DeepSpeed config's concrete batch and clipping values for
    the settings the run did not give (module docstring). A concrete train_batch_size fills
    whichever of micro batch and accumulation is left open (both open: accumulation 1, as
    DeepSpeed itself reads a config holding only the global batch). ``run.sources`` records the
    JSON as the origin of what it set. Raises ValueError naming both sides of any conflict."""
    check_sections(ds_config)
    run = copy.deepcopy(run)
    sources = dict(run.sources) if run.sources is not None else None
    taken: dict[str, str] = {}  # setting -> where its value came from, when it was not given
    for key, setting in DS_SETTINGS.items():
        value = _concrete(ds_config, key, integer=setting != "max_grad_norm")
        if value is None:
            continue
        origin, current = _given(run, setting), getattr(run, setting)
        if origin is None:
            setattr(run, setting, value)
            taken[setting] = f"the DeepSpeed config's {key}"
        elif value != current and not _from_preset(run, setting):
            raise ValueError(f"ds_config: {key} = {json.dumps(ds_config[key])} in {run.ds_config} disagrees with "
                             f"{setting} = {current} from {origin}; allowed: the same value both ways, or only one "
                             f"of them (\"auto\" in the JSON)")
    total = _concrete(ds_config, "train_batch_size", integer=True)
    if total is not None:
        _take_global_batch(run, total, world_size, taken)
    if sources is not None:
        run.sources = {**sources, **taken}
    run.validate()
    return run


def _take_global_batch(run: RunConfig, total: int, world_size: int, taken: dict[str, str]) -> None:
    """Fit micro_batch_size x gradient_accumulation_steps x world_size to the JSON's train_batch_size."""
    fixed = {name: _given(run, name) or taken.get(name) for name in ("micro_batch_size", "gradient_accumulation_steps")}
    micro, accumulation = run.micro_batch_size, run.gradient_accumulation_steps
    if all(fixed.values()):
        product = micro * accumulation * world_size
        if product != total:
            raise ValueError(
                f"ds_config: train_batch_size = {total} in {run.ds_config} disagrees with micro_batch_size {micro} "
                f"(from {fixed['micro_batch_size']}) x gradient_accumulation_steps {accumulation} (from "
                f"{fixed['gradient_accumulation_steps']}) x {world_size} rank(s) = {product}; allowed: a "
                f"consistent triple, or \"auto\" for one of them")
        return
    if fixed["micro_batch_size"]:
        open_name, known = "gradient_accumulation_steps", micro
    elif fixed["gradient_accumulation_steps"]:
        open_name, known = "micro_batch_size", accumulation
    else:  # only the global batch: DeepSpeed's reading, one micro-batch per step
        run.gradient_accumulation_steps, known, open_name = 1, 1, "micro_batch_size"
        taken["gradient_accumulation_steps"] = "the DeepSpeed config's train_batch_size"
    other = "micro_batch_size" if open_name == "gradient_accumulation_steps" else "gradient_accumulation_steps"
    if total % (known * world_size):
        raise ValueError(
            f"ds_config: train_batch_size = {total} in {run.ds_config} is not a multiple of {other} {known} x "
            f"{world_size} rank(s), so no {open_name} fits; allowed: a multiple of {known * world_size}, or "
            f"\"auto\"")
    setattr(run, open_name, total // (known * world_size))
    taken[open_name] = "the DeepSpeed config's train_batch_size"


def read_ds_config(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"ds_config: {path} is not valid JSON ({error})") from None


def fill_ds_config(ds_config: dict, run: RunConfig, world_size: int) -> dict:
    """A copy of ``ds_config`` with "auto" replaced; concrete values must agree with the run
    (take them into the run first with ``settings_from_ds_config``)."""
    filled = json.loads(json.dumps(ds_config))
    check_sections(filled)
    wanted = {
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "train_batch_size": run.global_batch_size(world_size),
        "gradient_clipping": run.max_grad_norm,
    }
    for key, value in wanted.items():
        given = filled.get(key, "auto")
        if given == "auto" or (key in DS_SETTINGS and _from_preset(run, DS_SETTINGS[key])):
            filled[key] = value
        elif given != value:
            setting = (f"micro_batch_size {run.micro_batch_size} x gradient_accumulation_steps "
                       f"{run.gradient_accumulation_steps} x {world_size} rank(s) = {value}"
                       if key == "train_batch_size" else f"{DS_SETTINGS[key]} = {value}")
            raise ValueError(f"ds_config: {key} = {json.dumps(given)} disagrees with the run's {setting}; "
                             f"allowed: the same value, or \"auto\"")
    stage = filled.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ds_config: zero_optimization.stage = {stage!r}; allowed: 0, 1, 2, 3")
    for monitor in ("tensorboard", "csv_monitor"):
        section = filled.get(monitor)
        if isinstance(section, dict) and section.get("output_path", "auto") == "auto":
            section["output_path"] = str(Path(run.output_dir) / "monitor")
    # The client optimizer is a torch AdamW: DeepSpeed must be told it may use it with ZeRO.
    filled["zero_allow_untested_optimizer"] = True
    return filled


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What ds_bilevel reads of a filled DeepSpeed config, read once (``read``) and handed to the
    model loading (models.load_model) and the engine."""

    config: dict
    """The filled config itself, as deepspeed.initialize and transformers' HfDeepSpeedConfig take it."""
    zero_stage: int
    """zero_optimization.stage (0 when absent)."""
    bf16: bool
    """bf16.enabled: compute weights in bf16, fp32 masters."""
    offload_optimizer: bool
    """zero_optimization.offload_optimizer.device is set (not "none"): DeepSpeed's CPU Adam."""

    @classmethod
    def read(cls, ds_config: dict | DeepSpeedSettings | None) -> DeepSpeedSettings:
        """The settings of a filled config (given settings pass through; None: an empty config)."""
        if isinstance(ds_config, DeepSpeedSettings):
            return ds_config
        config = ds_config or {}
        zero = config.get("zero_optimization", {})
        device = zero.get("offload_optimizer", {}).get("device", "none")
        return cls(config, zero.get("stage", 0), bool(config.get("bf16", {}).get("enabled")),
                   device not in (None, "none"))


def zero_stage(ds_config: dict) -> int:
    return DeepSpeedSettings.read(ds_config).zero_stage


def offloads_optimizer(ds_config: dict) -> bool:
    return DeepSpeedSettings.read(ds_config).offload_optimizer
