"""ZeRO-3: each rank's memory for the frozen base falls as 1/N.

    python -m bench zero3_scaling [--model builtin:mid-llama] [--ranks 1,2]

launch/train.py (LoRA, shipped ds_configs/cpu_zero3.json, bf16, a few steps of micro batch 1
and at most 32 tokens) with a model whose bf16 base dominates a rank's memory
(``builtin:mid-llama``, 0.82B parameters, 1.65 GB) on 1 and on N ranks, and the same runs with
``builtin:micro-llama`` (0.1M parameters), whose peak is the runtime alone (Python, torch,
DeepSpeed, data). Reported per rank: peak memory (ru_maxrss on CPU), the model's share (peak
minus the micro run's at the same world size), and the ideal 2 P / N bytes of a bf16 base.
"""

from __future__ import annotations

import argparse
import os

from bench.common import RUNS, builtin_shape, machine, save, table, train

GIB = 2**30


def run_args(model: str, ds_config: str, steps: int) -> list[str]:
    return ["--ds_config", ds_config, "--model_name_or_path", model, "--method", "lora", "--max_steps", str(steps),
            "--micro_batch_size", "1", "--gradient_accumulation_steps", "1", "--data.train_size", "16",
            "--data.eval_size", "2", "--data.max_length", "32", "--eval_batch_size", "1", "--eval_steps", "0"]


def measure(model: str, baseline: str, ranks: list[int], ds_config: str, steps: int) -> list[dict]:
    rows = []
    for n in ranks:
        peaks = {}
        for name in (baseline, model):
            load = os.getloadavg()[0]
            result = train(run_args(name, ds_config, steps), RUNS / f"zero3_{name.split(':')[-1]}_{n}", n, timed=False)
            peaks[name] = max(result["peak_memory_gb_per_rank"])
            print(f"{name} on {n} rank(s): peak {result['peak_memory_gb_per_rank']} GiB, load {load:.2f}", flush=True)
        rows.append({"ranks": n, "peak_gib": peaks[model], "runtime_gib": peaks[baseline],
                     "model_share_gib": peaks[model] - peaks[baseline], "loadavg_1min_before": round(load, 2)})
    return rows


def markdown(rows: list[dict], base: int) -> str:
    first = rows[0]
    return table(["ranks", "peak GiB/rank", "runtime alone GiB/rank", "model share GiB/rank", "bf16 base / N GiB",
                  "share / (base/N)", f"share vs {first['ranks']} rank(s)"],
                 [[r["ranks"], f"{r['peak_gib']:.3f}", f"{r['runtime_gib']:.3f}", f"{r['model_share_gib']:.3f}",
                   f"{base / r['ranks'] / GIB:.3f}", f"{r['model_share_gib'] / (base / r['ranks'] / GIB):.2f}",
                   f"{r['model_share_gib'] / first['model_share_gib']:.2f} (ideal {first['ranks'] / r['ranks']:.2f})"]
                  for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench zero3_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:mid-llama")
    parser.add_argument("--baseline", default="builtin:micro-llama")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--ds_config", default="ds_configs/cpu_zero3.json")
    parser.add_argument("--steps", type=int, default=2)
    options = parser.parse_args(argv)
    info = machine()
    rows = measure(options.model, options.baseline, [int(n) for n in options.ranks.split(",")], options.ds_config,
                   options.steps)
    base = 2 * builtin_shape(options.model)["parameters"]  # bf16
    path = save("zero3_scaling", {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                                  "model": options.model, "base_bytes_bf16": base, "ds_config": options.ds_config,
                                  "train_args": run_args(options.model, options.ds_config, options.steps),
                                  "rows": rows})
    print(markdown(rows, base))
    print(f"results: {path}")
