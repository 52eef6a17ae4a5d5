"""Train an adapter with DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/cpu_zero2.json --method lora

Every setting is checked (and the DeepSpeed config filled) before any process group
starts: a bad one prints one line naming it and exits with code 2.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import uuid
from pathlib import Path

from ds_bilevel.config import RunConfig, load_config
from ds_bilevel.phases import Phases


def prepare_process() -> None:
    """After the flags are read (--help and a bad flag answer without torch) and before DeepSpeed
    is imported anywhere: the accelerator, on CPU ranks the thread count, and the known noise
    (distributed.quiet_known_noise: two messages dropped by their exact text)."""
    from ds_bilevel.distributed import quiet_known_noise

    quiet_known_noise()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the cores: oversubscribed threads make every collective wait for a
            # descheduled peer (measured: 20x slower bi-level steps on 2 ranks of a 2-core machine).
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def check_output_dir(run: RunConfig) -> None:
    """The folder can be written (no file on its path), holds no other run unless told to overwrite
    or resume, and no live run holds its lock (files.take_lock)."""
    from ds_bilevel.files import LOCK, refuse_if_locked

    out = Path(run.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"output_dir: {existing} is a file, so {out} cannot be created"
                         if existing != out else f"output_dir: {out} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir: {existing} is not writable by this user, so {out} cannot be written")
    contents = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if contents and resumes_from_elsewhere(run) and not run.overwrite_output_dir:
        raise ValueError(f"output_dir: {out} holds another run and resume_from_checkpoint {run.resume_from_checkpoint} "
                         f"is not in it; resume into an empty output_dir, or pass --overwrite_output_dir true to "
                         f"replace that run")
    if contents and not (run.overwrite_output_dir or run.resume_from_checkpoint):
        raise ValueError(f"output_dir: {out} is not empty; choose another, resume with "
                         f"--resume_from_checkpoint latest, or pass --overwrite_output_dir true")
    refuse_if_locked(out)


def resumes_from_elsewhere(run: RunConfig) -> bool:
    """A resume from a checkpoint outside output_dir (another run's): output_dir's own files are then
    not that run's, and resuming into them would mix two runs' adapters, metrics and summary."""
    if not run.resume_from_checkpoint or run.resume_from_checkpoint == "latest":
        return False
    source, out = Path(run.resume_from_checkpoint).resolve(), Path(run.output_dir).resolve()
    # a path that is no checkpoint at all is refused as such by check_resume
    return source.is_dir() and source != out and out not in source.parents


def check_resume(run: RunConfig, ds_config: dict, world_size: int) -> None:
    """The checkpoint is whole (sizes, sha256: hashed once per node, by local rank 0) and fits this
    run: its schedule, adapters, ZeRO stage, precision, world size and base model."""
    from ds_bilevel.checkpoint import check_fits, check_schedule, resolve, run_facts
    from ds_bilevel.validation import training_mode

    checksums = os.environ.get("LOCAL_RANK", "0") == "0"
    folder, tag = resolve(run.resume_from_checkpoint, Path(run.output_dir), checksums=checksums)
    check_fits(folder / tag, run_facts(run, ds_config, world_size))
    check_schedule(folder / tag, training_mode(run), run)


def read_settings(argv: list[str] | None) -> RunConfig:
    """load_config, with a YAML file that does not parse as one line naming it."""
    import yaml

    try:
        return load_config(argv)
    except yaml.YAMLError as error:
        args = sys.argv[1:] if argv is None else argv
        path = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                     if a.split("=", 1)[0] == "--config" and ("=" in a or i + 1 < len(args))), "?")
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"config: {path} is not valid YAML ({problem}{where}); allowed: a YAML mapping of "
                         f"settings") from None


def validated_settings(argv: list[str] | None) -> tuple[RunConfig, dict]:
    """Every check of ds_bilevel/validation.py, before any process group starts; writes nothing."""
    run = read_settings(argv)
    prepare_process()
    from ds_bilevel.validation import check_launch, check_run, checked_ds_config, settle_eval_size

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run, ds_config = checked_ds_config(run, world_size)  # the JSON's values for what no flag or YAML set
    check_output_dir(run)
    run = settle_eval_size(run)  # a small file's held-out share (issue 18)
    check_run(run, world_size)
    if run.resume_from_checkpoint:
        check_resume(run, ds_config, world_size)
    check_launch(ds_config)
    return run, ds_config


def claim_output_dir(run: RunConfig, run_id: str) -> None:
    """Rank 0, after validation and before anything is written: lock the folder, then clear an
    overwritten run's files (checkpoints included) or, on resume, the record of the finished run."""
    from ds_bilevel.files import RUN_MANIFEST, clear_run_outputs, take_lock

    out = Path(run.output_dir)
    take_lock(out, run_id)
    if run.overwrite_output_dir and (not run.resume_from_checkpoint or resumes_from_elsewhere(run)):
        clear_run_outputs(out)
    else:
        (out / RUN_MANIFEST).unlink(missing_ok=True)


def check_finite_summary(summary: dict) -> None:
    """A run whose losses are not finite fails (exit 1) before its adapters and summary are written."""
    import math

    from ds_bilevel.engine import NonFiniteError

    keys = ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last")
    bad = [f"{key} {summary[key]}" for key in keys if isinstance(summary.get(key), float | int)
           and not math.isfinite(summary[key])]
    if bad:
        raise NonFiniteError(f"the run ended with non-finite losses ({', '.join(bad)}); its adapters and summary "
                             f"were not written. A NaN or infinite base weight, or settings such as adapter.alpha or "
                             f"learning_rate, make every loss non-finite (docs/failures.md)")


def print_summary(summary: dict) -> None:
    key = "accuracy" if "accuracy_before" in summary else "exact_match"  # a classifier's, or a causal LM's
    score = key.replace("_", " ")

    def before(name: str, digits: int) -> str:  # null: eval_before_training false
        return "n/a" if summary[name] is None else f"{summary[name]:.{digits}f}"

    print(
        "\n== ds_bilevel run summary ==\n"
        f"eval loss      {before('eval_loss_before', 4)} -> {summary['eval_loss_after']:.4f}\n"
        f"{score:<15}{before(key + '_before', 3)} -> {summary[key + '_after']:.3f}\n"
        f"train loss     {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}\n"
        f"throughput     {summary['tokens_per_s']:.0f} tokens/s over {summary['world_size']} ranks "
        f"({summary.get('steps_this_launch', summary['steps'])} steps in {summary['train_time_s']:.1f} s)\n"
        f"outputs        {summary['output_dir']} "
        "(adapter_model.safetensors, metrics.jsonl, training_curves.png, summary.json)"
    )


def main(argv: list[str] | None = None) -> int:
    phases = Phases()
    try:
        run, ds_config = validated_settings(argv)
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        run_id = uuid.uuid4().hex[:12]
        from ds_bilevel import checkpoint

        checkpoint.run_facts_of_this_run.clear()
        checkpoint.run_facts_of_this_run.update(checkpoint.run_facts(run, ds_config, world_size), run_id=run_id)
        if rank == 0:
            claim_output_dir(run, run_id)
    except ValueError as error:
        refuse(f"error: {' '.join(str(error).split())}")  # always one line, once
        return 2
    import torch

    from ds_bilevel.distributed import failure_line, release_shm_buffers, return_large_frees_to_the_os
    from ds_bilevel.ds_config import zero_stage

    if not torch.cuda.is_available() and zero_stage(ds_config) == 3:
        return_large_frees_to_the_os()  # gathered ZeRO-3 parameters must not stay resident on CPU ranks
    from ds_bilevel.checkpoint import DiskFull
    from ds_bilevel.distributed import Preempted, request_stop, reset_stop, watch_launcher
    from ds_bilevel.engine import NonFiniteError
    from ds_bilevel.files import release_lock, write_run_manifest
    from ds_bilevel.recipe import TrainingRecipe

    phases.mark("validation")
    recipe = TrainingRecipe(run, ds_config, phases)
    reset_stop()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # The deepspeed runner stopped alone (SIGTERM to it): its ranks stop too, as on SIGTERM.
    watch_launcher(lambda: request_stop("the deepspeed launcher ended") or os.kill(os.getpid(), signal.SIGTERM))
    try:
        recipe.setup()
        trained = recipe.train()
        check_finite_summary(trained)
        summary = recipe.save(trained)
        if recipe.rank == 0:
            print_summary(summary)  # summary.json holds every number (bench/ reads it there)
        recipe.cleanup()  # ends with a barrier: no collective follows
        recipe.release()  # an in-process caller (bench/gpu_worker.py) trains again with the memory back
        if recipe.rank == 0:  # the record that the folder's files belong to one finished run, then unlock
            write_run_manifest(Path(run.output_dir), run_id)
            release_lock(Path(run.output_dir))
    except Preempted as error:  # every rank, after the same step's checkpoint
        if recipe.rank == 0:
            report(f"error: {error}")
        return PREEMPTED_EXIT
    except DiskFull as error:
        report(f"error: rank {recipe.rank}: {error}")
        return 1
    except NonFiniteError as error:  # raised by every rank at the same step
        if recipe.rank == 0:
            report(f"error: {error}")
        return 1
    except Exception as error:
        if getattr(recipe, "rank", None) is None:
            raise  # failed before the process group existed: the traceback says it all
        traceback.print_exc()
        report(f"error: {failure_line(recipe.rank, error, getattr(recipe, 'heartbeat', None))}")
        return 1
    finally:
        # After a failure only on one rank: DeepSpeed's destroy synchronizes the device, which would
        # wait forever on a collective a dead peer left pending (docs/failures.md).
        if getattr(recipe, "world_size", None) == 1:
            recipe.release()
        release_shm_buffers()
    return 0


# How long a rank other than 0 holds back its refusal line: every rank validates the same settings, so
# rank 0 normally refuses too, its launcher then ends this rank, and the line is printed once.
REFUSAL_WAIT_S = 10.0


def refuse(line: str, wait_s: float | None = None) -> None:
    """A refusal (bad settings, exit 2) on stderr, from rank 0 at once. Another rank first waits
    ``wait_s``: when rank 0 refused as well, the deepspeed launcher ends this rank (SIGTERM, exit 2
    kept) before it prints; a rank still alive then refuses for a reason of its own (a file missing
    on its node, a checkpoint only it reads) and prints it."""
    import time

    if os.environ.get("RANK", "0") != "0":
        time.sleep(REFUSAL_WAIT_S if wait_s is None else wait_s)
    print(line, file=sys.stderr, flush=True)


def report(line: str) -> None:
    """An error line on stderr, on a line of its own even while a progress bar is drawn."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class Stopped(RuntimeError):
    """SIGTERM before training: the launcher stops every rank when one of them fails (or the job is
    cancelled)."""


# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: the run stopped on request.
PREEMPTED_EXIT = 143


def stop_on_sigterm(signum, frame):
    """SIGTERM during training asks every rank to save the step it reaches and stop
    (distributed.stop_requested; exit 143); before training it stops at once."""
    from ds_bilevel.distributed import request_stop

    if request_stop("SIGTERM"):
        if os.environ.get("RANK", "0") == "0":
            report("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        # The scheduler signals every process and DeepSpeed's launch.py signals its ranks again:
        # later SIGTERMs change nothing (SIGKILL, after launch.py's 30 s, still ends a stuck rank).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    stop_now(signum, frame)


def stop_now(signum, frame):
    raise Stopped("stopped by SIGTERM (the launcher stops all ranks when one fails, or the job was cancelled)")


if __name__ == "__main__":
    sys.exit(main())
