"""What every benchmark shares: launching ranks, reading a run's timing, describing the machine.

Benchmarks launch real processes (``python -m deepspeed.launcher.runner``) and read what
they wrote. Timing excludes warm-up: a run logs every ``WARMUP`` steps and the steady rate is
taken between the first log line and the last (``steady_rate``), so neither set-up, the
evaluations before and after training, nor the first steps count.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RUNS = REPO / "runs" / "bench"
WARMUP = 10
"""Steps excluded from timing at the start of every timed run (also the log interval)."""


def train_entry():
    """launch/train.py as a module (it is a script, not part of a package), for the workers that
    run many fine-tunes in one process through its own validation and main."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """CPU ranks: the CPU accelerator and one thread per rank (ranks share the cores)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not on_gpu():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def launch(script: Path, args: list[str], ranks: int, timeout: int = 3600, env: dict | None = None) -> str:
    """Run ``script args`` on ``ranks`` local ranks through the deepspeed launcher; its stdout.

    A failed launch raises with the end of its stderr, after removing the shared-memory
    all-reduce buffers its ranks may have left in /dev/shm."""
    port = free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), str(script), *args]
    result = subprocess.run(command, cwd=REPO, env={**launch_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            Path(path).unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def last_json_line(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object (bench/peft_worker.py prints its result so;
    launch/train.py writes its summary to summary.json instead: ``run_summary``)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the output:\n{stdout[-2000:]}")


def run_summary(output_dir: Path) -> dict:
    """The summary a finished launch/train.py run wrote to OUTPUT_DIR/summary.json."""
    path = Path(output_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the run did not finish")
    return json.loads(path.read_text())


def steady_rate(metrics_path: Path, warmup: int = WARMUP) -> dict:
    """Tokens/s and seconds per inner step between step ``warmup`` and the last logged step,
    from metrics.jsonl (each training line holds tokens_per_s and elapsed_s since the start)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    first = next(r for r in rows if r["step"] == warmup)
    last = rows[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / (last["step"] - first["step"]),
            "timed_steps": last["step"] - first["step"]}


def derived_ds_config(base: str, folder: Path, zero: dict) -> str:
    """A copy of the DeepSpeed config ``base`` with ``zero`` merged into zero_optimization,
    written to ``folder``/DS.json (kept next to the runs it served)."""
    config = json.loads((REPO / base).read_text())
    config["zero_optimization"].update(zero)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "DS.json"
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def timed_parser(name: str, doc: str):
    """The options every timed comparison shares (repeats, steps, model, DeepSpeed config, ranks)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", description=doc.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of runs, every configuration once per round in turn (medians reported)")
    parser.add_argument("--steps", type=int, default=60, help=f"steps per run (the first {WARMUP} untimed)")
    parser.add_argument("--model", default="builtin:tiny-llama", help="model of every run: a builtin name or an HF "
                        "folder")
    parser.add_argument("--ds_config", default="ds_configs/cpu_zero2.json", help="DeepSpeed config of every run")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per run (deepspeed --num_gpus)")
    return parser


def timed_args(model: str, steps: int, ds_config: str) -> list[str]:
    """train.py flags of a timed run: no evaluation inside the loop, a small one before and after
    (outside the timing) at the training micro batch, so that it cannot raise the memory peak."""
    return ["--ds_config", ds_config, "--model_name_or_path", model, "--max_steps", str(steps),
            "--eval_steps", "0", "--data.eval_size", "16", "--eval_batch_size", "8", "--micro_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--adapter.rank", "8", "--adapter.alpha", "16"]


def train(args: list[str], output_dir: Path, ranks: int = 2, timed: bool = True, timeout: int = 3600,
          env: dict | None = None) -> dict:
    """launch/train.py with ``args``: its summary, plus the steady rate (warm-up excluded) when ``timed``."""
    args = [*args, "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--log_steps", str(WARMUP)]
    launch(REPO / "launch" / "train.py", args, ranks, timeout, env)
    summary = run_summary(output_dir)
    rate = steady_rate(output_dir / "metrics.jsonl") if timed else {}
    return {**rate, "peak_memory_gb_per_rank": summary["peak_memory_gb_per_rank"],
            "train_time_s": summary["train_time_s"], "tokens_per_s_all_steps": summary["tokens_per_s"]}


def commit() -> str:
    """The commit measured: git's HEAD, or the .commit file of an exported snapshot
    (``git archive HEAD``, used to measure a fixed tree while the checkout changes)."""
    stamp = REPO / ".commit"
    if stamp.is_file():
        return stamp.read_text().strip()
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def builtin_shape(model: str) -> dict:
    """Parameter count and shapes of a builtin LLaMA (built on the meta device: no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    from ds_bilevel.builtin.model import builtin_llama_config
    from ds_bilevel.builtin.tokenizer import load_builtin_tokenizer

    config = builtin_llama_config(model, len(load_builtin_tokenizer()))
    with torch.device("meta"):
        module = LlamaForCausalLM(config)
    embedding = module.get_input_embeddings().weight.numel()
    return {"parameters": sum(p.numel() for p in module.parameters()), "embedding": embedding,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def machine() -> dict:
    """Where and when: CPU model, cores, accelerator, date, load average."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": model, "nproc": os.cpu_count(), "date": datetime.date.today().isoformat(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "commit": commit()}
    if on_gpu():
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def show(s: dict, digits: int = 3) -> str:
    """A spread as "median (min-max)"."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def save(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant digits."""
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])
