"""Train an adapter with DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/cpu_zero2.json --method lora

Every setting is checked (and the DeepSpeed config filled) before any process group
starts: a bad one prints one line naming it and exits with code 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    if "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores: oversubscribed threads make every collective wait for a
        # descheduled peer (measured: 20x slower bi-level steps on 2 ranks of a 2-core machine).
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))

from ds_bilevel.config import RunConfig, load_config  # noqa: E402
from ds_bilevel.phases import Phases  # noqa: E402
from ds_bilevel.validation import check_run, checked_ds_config  # noqa: E402


def check_output_dir(run: RunConfig) -> None:
    out = Path(run.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (run.overwrite_output_dir or run.resume_from_checkpoint):
        raise ValueError(f"output_dir: {out} is not empty; choose another, resume with "
                         f"--resume_from_checkpoint latest, or pass --overwrite_output_dir true")
    if run.resume_from_checkpoint:
        from ds_bilevel.checkpoint import check_schedule, resolve
        from ds_bilevel.validation import training_mode

        folder, tag = resolve(run.resume_from_checkpoint, out)
        check_schedule(folder / tag, training_mode(run), run)


def validated_settings(argv: list[str] | None) -> tuple[RunConfig, dict]:
    """Every check of ds_bilevel/validation.py, before any process group starts; writes nothing."""
    run = load_config(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run, ds_config = checked_ds_config(run, world_size)  # the JSON's values for what no flag or YAML set
    check_output_dir(run)
    check_run(run, world_size)
    return run, ds_config


def print_summary(summary: dict) -> None:
    key = "accuracy" if "accuracy_before" in summary else "exact_match"  # a classifier's, or a causal LM's
    score = key.replace("_", " ")
    print(
        "\n== ds_bilevel run summary ==\n"
        f"eval loss      {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}\n"
        f"{score:<15}{summary[key + '_before']:.3f} -> {summary[key + '_after']:.3f}\n"
        f"train loss     {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}\n"
        f"throughput     {summary['tokens_per_s']:.0f} tokens/s over {summary['world_size']} ranks "
        f"({summary['steps']} steps in {summary['train_time_s']:.1f} s)\n"
        f"outputs        {summary['output_dir']} "
        "(adapter_model.safetensors, metrics.jsonl, training_curves.png, summary.json)"
    )


def main(argv: list[str] | None = None) -> int:
    phases = Phases()
    try:
        run, ds_config = validated_settings(argv)
    except ValueError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
        return 2
    from ds_bilevel.distributed import failure_line, release_shm_buffers, return_large_frees_to_the_os
    from ds_bilevel.ds_config import zero_stage

    if not torch.cuda.is_available() and zero_stage(ds_config) == 3:
        return_large_frees_to_the_os()  # gathered ZeRO-3 parameters must not stay resident on CPU ranks
    from ds_bilevel.engine import NonFiniteError
    from ds_bilevel.recipe import TrainingRecipe

    phases.mark("validation")
    recipe = TrainingRecipe(run, ds_config, phases)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        recipe.setup()
        summary = recipe.save(recipe.train())
        if recipe.rank == 0:
            print_summary(summary)
            print(json.dumps(summary))
        recipe.cleanup()  # ends with a barrier: no collective follows
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
        release_shm_buffers()
    return 0


def report(line: str) -> None:
    """An error line on stderr, on a line of its own even while a progress bar is drawn."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


class Stopped(RuntimeError):
    """SIGTERM: the launcher stops every rank when one of them fails (or the job is cancelled)."""


def stop_on_sigterm(signum, frame):
    raise Stopped("stopped by SIGTERM (the launcher stops all ranks when one fails, or the job was cancelled)")


if __name__ == "__main__":
    sys.exit(main())
