"""Checks before launch: the settings together, the DeepSpeed config, the model and the data.

``launch/train.py`` calls these on every rank before any process group starts; each raises
``ValueError("<setting>: <bad value> ...; allowed: ...")`` on the first problem and writes
nothing (datasets caches under ~/.cache, never under ``output_dir``). Per-field checks stay
with their settings (``RunConfig.validate`` and the sections' ``validate``); this module holds
what needs several settings, the DeepSpeed config, the model's shapes or the data:

- the DeepSpeed config: JSON objects where DeepSpeed wants them, its batch and clipping values
  taken where no flag or YAML set them and refused where one set another value, no "auto" left that
  ds_bilevel does not fill, offload only at the ZeRO stages DeepSpeed supports it at;
- the schedule: a bi-level run reaches an outer step, options only read by another method
  or format are not given;
- the model, built on the meta device with accelerate's ``init_empty_weights`` (no weight is
  read or allocated, so a 70B folder costs a config read): every target module exists and
  every rank fits every targeted layer (``adapters.inject.target_layer_names``);
- the data, read with ``data.py``'s loaders: the file loads, the fields exist, the training,
  evaluation, D1 and D2 sets are non-empty and each holds at least one global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ds_bilevel.builtin.model import is_builtin
from ds_bilevel.config import RunConfig
from ds_bilevel.ds_config import fill_ds_config, read_ds_config, settings_from_ds_config, zero_stage

OBJECT_SECTIONS = ("zero_optimization", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# DeepSpeed honours each offload from these stages on: (section, device) -> lowest stage.
OFFLOAD_MIN_STAGE = {("offload_optimizer", "cpu"): 1, ("offload_optimizer", "nvme"): 3,
                     ("offload_param", "cpu"): 3, ("offload_param", "nvme"): 3}
FILLED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "tensorboard.output_path", "csv_monitor.output_path")


def checked_ds_config(run: RunConfig, world_size: int) -> tuple[RunConfig, dict]:
    """(the run with the DeepSpeed config's values for what it did not set, the DeepSpeed config
    read, filled from that run and checked as a whole). Precedence: ds_config.py's docstring."""
    raw = read_ds_config(run.ds_config)
    if not isinstance(raw, dict):
        raise ValueError(f"ds_config: {run.ds_config} holds {json.dumps(raw)[:60]}; allowed: a JSON object")
    zero = raw.get("zero_optimization", {})
    sections = [(name, raw.get(name)) for name in OBJECT_SECTIONS]
    sections += [(f"zero_optimization.{name}", zero.get(name) if isinstance(zero, dict) else None)
                 for name in ("offload_optimizer", "offload_param")]
    for name, value in sections:
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"ds_config: {name} = {json.dumps(value)}; allowed: a JSON object "
                             f"such as {{\"enabled\": true}} or {{\"stage\": 2}}")
    run = settings_from_ds_config(raw, run, world_size)
    filled = fill_ds_config(raw, run, world_size)
    for key, value in _leaves(filled):
        if value == "auto" and key not in FILLED_KEYS:
            raise ValueError(f"ds_config: {key} = \"auto\", which ds_bilevel does not fill; allowed: a value, "
                             f"\"auto\" only in {', '.join(FILLED_KEYS)}")
    stage = zero_stage(filled)
    for (section, device), lowest in OFFLOAD_MIN_STAGE.items():
        offload = filled.get("zero_optimization", {}).get(section) or {}
        given = offload.get("device", "none")
        if given not in OFFLOAD_DEVICES:
            raise ValueError(f"ds_config: zero_optimization.{section}.device = {given!r}; "
                             f"allowed: {list(OFFLOAD_DEVICES)}")
        if given == device and stage < lowest:
            raise ValueError(f"ds_config: zero_optimization.{section} to {device} at zero_optimization.stage "
                             f"{stage}; allowed: stage {lowest}{' or more' if lowest < 3 else ''} (DeepSpeed "
                             f"ignores it below)")
        if given == device == "nvme" and not offload.get("nvme_path"):
            raise ValueError(f"ds_config: zero_optimization.{section}.nvme_path is missing; allowed: "
                             f"a local NVMe folder when the device is nvme")
    return run, filled


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def training_mode(run: RunConfig) -> str:
    from ds_bilevel.adapters import METHODS

    return METHODS[run.adapter.method].training_mode


def check_schedule(run: RunConfig) -> None:
    """Settings that only make sense together."""
    mode, bilevel = training_mode(run), run.bilevel
    if mode == "bilevel" and bilevel.unroll_steps > run.max_steps:
        raise ValueError(f"bilevel.unroll_steps: {bilevel.unroll_steps} exceeds max_steps {run.max_steps}, so "
                         f"no outer step would run; allowed: 1 to {run.max_steps}")
    if run.data.validation_file and mode != "bilevel":
        raise ValueError(f"data.validation_file: {run.data.validation_file!r} is D2, which method "
                         f"{run.adapter.method} never reads; allowed: only with bilora or bidora")
    if run.data.label_names and run.data.format != "classification":
        raise ValueError(f"data.label_names: {run.data.label_names} with data.format {run.data.format!r}; "
                         f"allowed: only with data.format classification")


def model_skeleton(run: RunConfig):
    """The model with every tensor on the meta device: its modules and shapes, no weights."""
    from accelerate import init_empty_weights

    from ds_bilevel.builtin.model import builtin_llama_config

    name = run.model_name_or_path
    if is_builtin(name):
        from transformers import LlamaForCausalLM

        from ds_bilevel.models import load_tokenizer

        config = builtin_llama_config(name, len(load_tokenizer(name)))
        with init_empty_weights():
            return LlamaForCausalLM._from_config(config)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=run.trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=run.trust_remote_code)
    except (ValueError, KeyError, OSError, ImportError) as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"model_name_or_path: {name!r} cannot be built as a causal LM ({type(error).__name__}: "
                         f"{detail}); allowed: a transformers causal-LM folder (trust_remote_code true for "
                         f"custom code)") from None


def check_model(run: RunConfig) -> None:
    """Targets and ranks against the model's layers (an encoder's: its head excluded, heads.py)."""
    from ds_bilevel.adapters.inject import target_layer_names
    from ds_bilevel.heads import head_names
    from ds_bilevel.models import encoder_skeleton

    encoder = encoder_skeleton(run.model_name_or_path, run.trust_remote_code)  # heads.py: with its head
    if encoder is None:
        target_layer_names(model_skeleton(run), run.adapter)
    elif run.data.format != "classification":
        raise ValueError(f"data.format: {run.data.format!r} needs a causal LM, but {run.model_name_or_path} is an "
                         f"encoder (heads.py); allowed with it: classification")
    else:
        target_layer_names(encoder, run.adapter, exclude=head_names(encoder))
    if not is_builtin(run.model_name_or_path):
        check_model_weights(Path(run.model_name_or_path))


def check_tokenizer(run: RunConfig) -> None:
    """What the data code needs of the tokenizer (an EOS for a causal LM, a pad id): found here, not
    as a crash in tokenisation after launch (models.check_tokenizer)."""
    from ds_bilevel.models import check_tokenizer as check

    check(run.model_name_or_path, run.trust_remote_code)


def check_model_weights(folder: Path) -> None:
    """Weights as safetensors, whole: a truncated download fails here in one line, not in torch."""
    from ds_bilevel.files import check_weights_folder

    if not check_weights_folder(folder, "model_name_or_path"):
        raise ValueError(f"model_name_or_path: {folder} holds no *.safetensors weights; allowed: a folder written "
                         f"by save_pretrained (safetensors)")


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars or log lines from datasets: the check's only output is its error."""
    from datasets.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def data_sizes(run: RunConfig) -> dict[str, int]:
    """How many examples each set a step draws from holds: {"the training set": n, ...}."""
    from ds_bilevel.data import BUILTIN_DATASETS, load_records, load_validation
    from ds_bilevel.schedule import split_d1_d2

    if run.dataset in BUILTIN_DATASETS:  # generated: exactly the configured sizes, no need to build them
        train, evaluation = run.data.train_size, run.data.eval_size
    else:
        with quiet_datasets():
            train, evaluation = (len(records) for records in load_records(run.dataset, run.data, run.seed))
    sizes = {"the evaluation set": evaluation}
    if training_mode(run) != "bilevel":
        return {"the training set": train, **sizes}
    if run.data.validation_file:
        with quiet_datasets():
            return {"D1 (the training set)": train, "D2 (data.validation_file)": len(load_validation(run.data)),
                    **sizes}
    d1, d2 = split_d1_d2(train, run.bilevel.split_ratio, run.seed)
    return {"D1 (the training set's split_ratio share)": len(d1), "D2 (the rest)": len(d2), **sizes}


def check_data(run: RunConfig, world_size: int) -> None:
    """Every set non-empty (the loaders and the split refuse empty ones) and, but for the
    evaluation set (read in padded batches), at least one global batch."""
    global_batch = run.global_batch_size(world_size)
    for name, size in data_sizes(run).items():
        if name != "the evaluation set" and size < global_batch:
            raise ValueError(f"micro_batch_size: {run.micro_batch_size} x gradient_accumulation_steps "
                             f"{run.gradient_accumulation_steps} x {world_size} rank(s) = {global_batch} examples "
                             f"per step exceeds the {size} of {name}; allowed: a global batch of at most {size}")


def check_kernels(run: RunConfig) -> None:
    """use_liger_kernel and torch_compile only where they can run (kernels.unsupported: a CUDA
    GPU, Liger installed, a family Liger is applied to)."""
    from ds_bilevel.kernels import unsupported

    for setting in ("use_liger_kernel", "torch_compile"):
        if getattr(run, setting):
            reason = unsupported(setting, _model_type(run) if setting == "use_liger_kernel" else None)
            if reason:
                raise ValueError(f"{setting}: true, but {reason}; allowed: false")


def _model_type(run: RunConfig) -> str:
    from ds_bilevel.builtin.model import is_builtin_encoder

    name = run.model_name_or_path
    if is_builtin(name):
        return "roberta" if is_builtin_encoder(name) else "llama"
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=run.trust_remote_code).model_type


def check_run(run: RunConfig, world_size: int) -> None:
    """Everything but the DeepSpeed config, cheapest first."""
    from ds_bilevel.hypergrad.config import detach_norm_warning

    warning = detach_norm_warning(run.adapter.method, run.adapter.detach_norm, run.bilevel.hypergrad)
    if warning and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {warning}", file=sys.stderr)  # allowed, but said once, before launch
    check_schedule(run)
    check_kernels(run)
    check_model(run)
    check_tokenizer(run)
    check_data(run, world_size)
