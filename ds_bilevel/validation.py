"""Checks before launch: the settings together, the DeepSpeed config, the data and the launch
environment; the model's own checks are in model_checks.py, which ``check_run`` calls.

``launch/train.py`` calls these on every rank before any process group starts; each raises
``ValueError("<setting>: <bad value> ...; allowed: ...")`` on the first problem and writes
nothing (datasets caches under ~/.cache, never under ``output_dir``). Per-field checks stay
with their settings (``RunConfig.validate`` and the sections' ``validate``); this module holds
what needs several settings, the DeepSpeed config or the data:

- the DeepSpeed config: JSON objects where DeepSpeed wants them, its batch and clipping values
  taken where no flag or YAML set them and refused where one set another value, no "auto" left that
  ds_bilevel does not fill, offload only at the ZeRO stages DeepSpeed supports it at;
- the schedule: a bi-level run reaches an outer step, options only read by another method
  or format are not given;
- the data, read with ``data.py``'s loaders: the file loads, the fields exist, the training,
  evaluation, D1 and D2 sets are non-empty and each holds at least one global batch;
- the model (model_checks.py): every target module exists and every rank fits every targeted
  layer, data.max_length fits a learned position table, a folder's weights are whole, the
  tokenizer has what the data code needs;
- the launch: NVMe offload's async I/O, the master port, stale op-build locks.

Cheapest first (issue 13): a refusal that needs neither the data file nor transformers comes
before anything imports them (for a builtin model and data, transformers is imported only by the
tokenizer check, the last of the model's).
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
    from ds_bilevel.precision import bf16_second_order_warning

    warn_once(bf16_second_order_warning(run.bilevel.hypergrad, run.adapter.method, filled))
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


def methods_of_mode(mode: str) -> list[str]:
    """The registry's methods whose layers train in ``mode`` (a TrainingMode value), in its order."""
    from ds_bilevel.adapters import METHODS

    return [name for name, entry in METHODS.items() if entry.training_mode == mode]


def check_schedule(run: RunConfig) -> None:
    """Settings that only make sense together."""
    mode, bilevel = training_mode(run), run.bilevel
    if mode == "bilevel" and bilevel.unroll_steps > run.max_steps:
        raise ValueError(f"bilevel.unroll_steps: {bilevel.unroll_steps} exceeds max_steps {run.max_steps}, so "
                         f"no outer step would run; allowed: 1 to {run.max_steps}")
    if run.data.validation_file and mode != "bilevel":
        bilevel_methods = " or ".join(methods_of_mode("bilevel"))
        raise ValueError(f"data.validation_file: {run.data.validation_file!r} is D2, which method "
                         f"{run.adapter.method} never reads; allowed: only with {bilevel_methods}")
    if run.data.label_names and run.data.format != "classification":
        raise ValueError(f"data.label_names: {run.data.label_names} with data.format {run.data.format!r}; "
                         f"allowed: only with data.format classification")


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
    GPU, Liger installed, a family Liger is applied to); the loss inside the output head
    (linear_cross_entropy, and use_liger_kernel's fused loss) only on a causal LM whose forward
    returns the head's output unchanged and whose head is no adapter target (loss_head.unsupported)."""
    from ds_bilevel.kernels import unsupported

    for setting in ("use_liger_kernel", "torch_compile"):
        if getattr(run, setting):
            reason = unsupported(setting, _model_type(run) if setting == "use_liger_kernel" else None)
            if reason:
                raise ValueError(f"{setting}: true, but {reason}; allowed: false")
    for setting in ("linear_cross_entropy", "use_liger_kernel"):
        if getattr(run, setting):
            from ds_bilevel.loss_head import unsupported as loss_head_unsupported

            reason = loss_head_unsupported(_model_type(run), run.adapter.target_modules)
            if reason:
                raise ValueError(f"{setting}: true, but {reason}; allowed: false")


def _model_type(run: RunConfig) -> str:
    from ds_bilevel.builtin.model import is_builtin_encoder

    name = run.model_name_or_path
    if is_builtin(name):
        return "roberta" if is_builtin_encoder(name) else "llama"
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=run.trust_remote_code).model_type


def check_values(run: RunConfig) -> None:
    """Every setting has its declared type (whatever path it came by: flag, YAML, code) and every
    number is finite: a NaN learning rate or an infinite hypergradient eps fails here, not in
    the middle of training."""
    import math
    import typing

    from ds_bilevel.config import flat_field_types

    defaults = RunConfig()
    for key, hint in flat_field_types().items():
        section, _, leaf = key.rpartition(".")
        value = getattr(getattr(run, section) if section else run, leaf)
        if value is None and getattr(getattr(defaults, section) if section else defaults, leaf) is None:
            continue  # unset, as by default (adapter.detach_norm: the method's own)
        allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif float in allowed:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif int in allowed:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = any(isinstance(value, a) for a in allowed if isinstance(a, type))
        if not ok:
            name = getattr(hint, "__name__", str(hint))
            raise ValueError(f"{key}: {value!r} ({type(value).__name__}) is not a valid {name}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a finite number; allowed: a finite value (see --help)")


def check_run(run: RunConfig, world_size: int) -> None:
    """Everything but the DeepSpeed config, cheapest first: the data before the model (a builtin
    set's sizes cost nothing, a file's read less than transformers' import, which the model's checks
    need but for a builtin LLaMA's targets and ranks), the tokenizer last."""
    from ds_bilevel.bilevel_config import detach_norm_warning
    from ds_bilevel.model_checks import check_model, check_tokenizer

    warn_once(detach_norm_warning(run.adapter.method, run.adapter.detach_norm, run.bilevel.hypergrad))
    check_values(run)
    check_schedule(run)
    check_kernels(run)
    check_data(run, world_size)
    encoder = check_model(run)
    check_tokenizer(run, encoder)


def settle_eval_size(run: RunConfig) -> RunConfig:
    """A data file's held-out evaluation share when data.eval_size was not given: the default 256,
    but at most 10% of the file's rows (at least 1), so that a small file trains (issue 18). A
    given eval_size is kept (and refused when it leaves no training example)."""
    from ds_bilevel.data import BUILTIN_DATASETS, read_file_or_hub

    if run.dataset in BUILTIN_DATASETS or run.sources is None or "data.eval_size" in run.sources:
        return run
    with quiet_datasets():
        rows = len(read_file_or_hub(run.dataset, run.data))
    run.data.eval_size = min(run.data.eval_size, max(1, rows // 10))
    return run


def check_launch(ds_config: dict) -> None:
    """What would fail only once the processes start: NVMe offload without DeepSpeed's async I/O,
    rank 0's master port taken by another process, a DeepSpeed op build left locked by a killed
    launch (later launches would wait on it forever, silently)."""
    check_async_io(ds_config)
    check_master_port()
    check_op_build_locks()
    from ds_bilevel.precision import emulated_bf16_warning

    warn_once(emulated_bf16_warning(ds_config))  # allowed (the numbers are right), but said


def warn_once(warning: str | None) -> None:
    """An allowed but doubtful choice, said once (by rank 0), before launch."""
    if warning and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {warning}", file=sys.stderr)


def check_async_io(ds_config: dict) -> None:
    zero = ds_config.get("zero_optimization", {})
    nvme = [name for name in ("offload_optimizer", "offload_param") if (zero.get(name) or {}).get("device") == "nvme"]
    if not nvme:
        return
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        compatible = AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:  # no such builder for this accelerator
        compatible = False
    if not compatible:
        raise ValueError(f"ds_config: zero_optimization.{nvme[0]}.device = \"nvme\", but DeepSpeed's async I/O "
                         f"op cannot be built here (libaio missing: apt install libaio-dev, then ds_report shows "
                         f"async_io OK); allowed: device \"cpu\" or \"none\"")


def check_master_port() -> None:
    """Rank 0 hosts the process group's store on MASTER_PORT: taken already, the launch would end
    in 'address already in use' after the other ranks started. Not checked where a torchrun
    agent hosts the store itself, nor in a process whose process group already exists (it holds
    the port itself: a second run in one process, as bench/gpu_worker.py does)."""
    import socket

    import torch.distributed

    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK", "0")
    if (not port or rank != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            or torch.distributed.is_initialized()):
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError as error:
            raise ValueError(f"MASTER_PORT: {port} is in use on this machine ({error.strerror}: another job or "
                             f"launch holds it); allowed: a free port (deepspeed --master_port N, or unset "
                             f"MASTER_PORT without a launcher)") from None


# A build takes about a minute; a lock older than this was left by a killed build.
STALE_BUILD_LOCK_S = 600


def check_op_build_locks() -> None:
    """torch's extension builds (DeepSpeed's ops: the CPU shared-memory all-reduce, ...) take a
    ``lock`` file in the build folder and later builds wait until it goes; a launch killed while
    building leaves it for ever. Refuse one older than STALE_BUILD_LOCK_S, naming it."""
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        locks = list(Path(root).glob("*/lock"))
    else:  # torch's default: <cache>/torch_extensions/py311_cu121/<op>/lock
        try:
            from torch.utils.cpp_extension import get_default_build_root
        except ImportError:
            return
        locks = list(Path(get_default_build_root()).glob("*/*/lock"))
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            continue
        if age > STALE_BUILD_LOCK_S:
            raise ValueError(f"DeepSpeed op build: {lock} was left {age / 60:.0f} minutes ago by a build that was "
                             f"killed, and would make this launch wait for ever; delete it (rm {lock}) and launch "
                             f"again")
