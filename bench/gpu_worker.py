"""One launch, several measurements: the configurations of a plan run one after another in the
same ranks (``python -m bench gpu`` writes the plan and launches this once per ZeRO stage).

    python -m deepspeed.launcher.runner --num_gpus 1 bench/gpu_worker.py PLAN.json

Each configuration is either ours (launch/train.py's ``main`` with its flags, in process) or the
PEFT peer (bench/peft_worker.py's ``main``). Between configurations the accelerator's peak-memory
counter is reset, and each row's peak is reported above what was still allocated when it began,
so each row's peak is its own (measured on an H100 before runs freed their engines,
``distributed.destroy_engine``: each ds_bilevel run left its model, about 1.5 GB; what is left
now is recorded as ``memory_left_by_earlier_configs_gb``). On CPU the peak resident set only
grows: the smoke run's memory column is the process's running maximum. Rank 0 prints one line per
configuration, ``BENCH {json}``; a configuration that fails is recorded with its error and the
next one runs. Past the plan's deadline (epoch seconds) the remaining ones are recorded as skipped.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launcher
WORKER_START = time.time()

from bench.common import train_entry  # noqa: E402


def last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the output:\n{text[-2000:]}")


def agree(flag: bool) -> bool:
    """The same decision on every rank (any rank's True), once the process group exists."""
    import torch

    try:
        import deepspeed.comm as dist

        if not dist.is_initialized():
            return flag
        from deepspeed.accelerator import get_accelerator

        value = torch.tensor([float(flag)], device=get_accelerator().current_device_name())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
    except ImportError:
        return flag


def reset_between_configs() -> None:
    """Drop what the previous configuration left: the ZeRO-3 config transformers reads (a PEFT run
    loads through models.load_model too), cached memory, the peak-memory counter."""
    import torch

    import ds_bilevel.models

    ds_bilevel.models._HF_DEEPSPEED_CONFIG = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_config(config: dict, warmup: int) -> dict:
    """One configuration in this process: its timing, memory and start-up numbers."""
    import torch

    from bench.common import run_summary, steady_rate

    # What earlier configurations of this process left allocated (caches, anything not freed):
    # the peak counter starts there, so each row's peak is taken above it.
    baseline_gb = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    started = time.perf_counter()
    captured = io.StringIO()
    if config["kind"] == "peft":
        from bench import peft_worker

        with contextlib.redirect_stdout(captured):
            peft_worker.main([*config["argv"], "--peft_method", config["method"], "--warmup", str(warmup)])
        result = last_json(captured.getvalue()) if os.environ.get("RANK", "0") == "0" else {}
    else:
        with contextlib.redirect_stdout(captured):
            code = train_entry().main(config["argv"])
        if code != 0:
            raise RuntimeError(f"launch/train.py returned {code}")
        result = {}
        if os.environ.get("RANK", "0") == "0":
            output_dir = Path(config["argv"][config["argv"].index("--output_dir") + 1])
            summary = run_summary(output_dir)  # train.py prints no JSON line: summary.json holds it
            result = {**steady_rate(output_dir / "metrics.jsonl", warmup),
                      "peak_memory_gb_per_rank": summary["peak_memory_gb_per_rank"],
                      "train_time_s": summary["train_time_s"], "tokens_per_s_all_steps": summary["tokens_per_s"]}
            if "phases" in summary:  # the run's own start-up breakdown, where recipe.py records one
                result["phases"] = summary["phases"]
    wall = time.perf_counter() - started
    if "peak_memory_gb_per_rank" in result:  # rank 0's baseline for every rank (the same work on each)
        result["peak_memory_gb_per_rank"] = [round(p - baseline_gb, 3) for p in result["peak_memory_gb_per_rank"]]
        result["memory_left_by_earlier_configs_gb"] = round(baseline_gb, 3)
    result["wall_s"] = wall
    if "train_time_s" in result:  # set-up, evaluations before and after, the save: all but the loop
        result["outside_training_s"] = wall - result["train_time_s"]
    return result


def main(argv: list[str]) -> None:
    plan = json.loads(Path(next(a for a in argv if not a.startswith("--"))).read_text())  # past --local_rank
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        print("BENCH " + json.dumps({"worker_start_after_launch_s": WORKER_START - plan["launched_at"]}), flush=True)
    for config in plan["configs"]:
        row = {"name": config["name"], "group": plan["group"]}
        if agree(time.time() > plan["deadline"]):
            row["skipped"] = "past the time budget"
        else:
            reset_between_configs()
            try:
                row.update(run_config(config, plan["warmup"]))
            except Exception as error:  # recorded; the next configuration still runs
                traceback.print_exc()
                row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        if rank0:
            print("BENCH " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
