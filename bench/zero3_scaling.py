"""ZeRO-3: each rank's memory for the frozen base falls as 1/N.

    python -m bench zero3_scaling [--model builtin:mid-llama] [--ranks 1,2] [--max_live 1e8]
                                  [--mmap_threshold 1048576]

launch/train.py (LoRA, ds_configs/cpu_zero3.json, bf16, a few steps of micro batch 1 and at
most 32 tokens) with a model whose bf16 base dominates a rank's memory (``builtin:mid-llama``,
0.82B parameters, 1.65 GB) on 1 and on N ranks, and the same runs with ``builtin:micro-llama``
(0.1M parameters), whose peak is the runtime alone (Python, torch, DeepSpeed, data). Reported
per rank: peak memory (ru_maxrss on CPU), the model's share (peak minus the micro run's at the
same world size), and the ideal 2 P / N bytes of a bf16 base.

``--max_live`` bounds the gathered working set (stage3_max_live_parameters and
stage3_max_reuse_distance; the shipped config leaves DeepSpeed's 1e9, the whole model here).
``--mmap_threshold`` sets glibc's MALLOC_MMAP_THRESHOLD_ for the ranks: by default glibc raises
its mmap threshold after the first large free, then serves the gathered-parameter buffers
(up to 32 MB) from its heap and keeps the freed memory, which ru_maxrss counts.
"""

from __future__ import annotations

import argparse
import os

from bench.common import RUNS, builtin_shape, derived_ds_config, machine, save, table, train

GIB = 2**30


def run_args(model: str, ds_config: str, steps: int) -> list[str]:
    return ["--ds_config", ds_config, "--model_name_or_path", model, "--method", "lora", "--max_steps", str(steps),
            "--micro_batch_size", "1", "--gradient_accumulation_steps", "1", "--data.train_size", "16",
            "--data.eval_size", "2", "--data.max_length", "32", "--eval_batch_size", "1", "--eval_steps", "0"]


def measure(model: str, baseline: str, ranks: list[int], ds_config: str, steps: int, env: dict) -> list[dict]:
    rows = []
    for n in ranks:
        peaks = {}
        for name in (baseline, model):
            load = os.getloadavg()[0]
            result = train(run_args(name, ds_config, steps), RUNS / f"zero3_{name.split(':')[-1]}_{n}", n, timed=False,
                           env=env)
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
    parser = argparse.ArgumentParser(prog="python -m bench zero3_scaling", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="builtin:mid-llama", help="the model whose base dominates a rank's memory")
    parser.add_argument("--baseline", default="builtin:micro-llama",
                        help="a tiny model run the same way: its peak is the runtime alone, subtracted from --model's")
    parser.add_argument("--ranks", default="1,2", help="comma-separated world sizes, one run of each model per size")
    parser.add_argument("--ds_config", default="ds_configs/cpu_zero3.json", help="the ZeRO-3 DeepSpeed config")
    parser.add_argument("--steps", type=int, default=2, help="LoRA training steps per run")
    parser.add_argument("--max_live", type=float, default=0.0,
                        help="bound stage3_max_live_parameters and stage3_max_reuse_distance (0: the config's own)")
    parser.add_argument("--mmap_threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ (bytes) for the ranks: glibc then returns the freed buffers of "
                             "gathered parameters to the OS instead of keeping them in its heap (0: glibc's default)")
    options = parser.parse_args(argv)
    env = {"MALLOC_MMAP_THRESHOLD_": str(options.mmap_threshold)} if options.mmap_threshold else {}
    if options.max_live:
        options.ds_config = derived_ds_config(options.ds_config, RUNS / f"zero3_live_{options.max_live:.0e}", {
            "stage3_max_live_parameters": options.max_live, "stage3_max_reuse_distance": options.max_live})
    info = machine()
    rows = measure(options.model, options.baseline, [int(n) for n in options.ranks.split(",")], options.ds_config,
                   options.steps, env)
    base = 2 * builtin_shape(options.model)["parameters"]  # bf16
    name = "zero3_scaling" + (f"_live_{options.max_live:.0e}" if options.max_live else "") + (
        f"_mmap_{options.mmap_threshold}" if options.mmap_threshold else "")
    path = save(name, {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()], "model": options.model,
                       "env": env, "base_bytes_bf16": base, "ds_config": options.ds_config,
                       "train_args": run_args(options.model, options.ds_config, options.steps), "rows": rows})
    print(markdown(rows, base))
    print(f"results: {path}")
