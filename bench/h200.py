"""Throughput of an 8B-shaped model on a GPU: tokens/s, MFU and peak memory per method.

    python -m bench h200                  # on a GPU machine (one H200: 8.0B bf16 fits unpartitioned)
    python -m bench h200 --smoke          # the same logic on 2 CPU ranks with builtin:micro-llama

launch/train.py with ``builtin:llama-3-8b-shape`` (LLaMA-3-8B's shapes, random weights), bf16,
activation checkpointing, ds_configs/zero2_bf16.json, LoRA-size adapters (r = 16 on all seven
projections), sequences of exactly ``--seq`` tokens (a generated JSONL file), for LoRA, BiDoRA
first_order and darts (T1 = 1) and Bi-LoRA. Timing skips the first 10 steps.

FLOPs convention (PaLM's, Chowdhery et al. 2022, appendix B): a pass over one token costs
6 N + 12 L h T, N the parameters outside the input embedding (the lm_head included), L layers,
h hidden size, T the sequence length; the frozen base and activation recomputation are not
discounted or added. MFU = passes per inner step x global-batch tokens x that cost / time per
inner step / (GPUs x peak bf16 FLOP/s); "useful MFU" counts one pass per inner step (LoRA's work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string

from bench.common import RUNS, builtin_shape, machine, save, table, train
from bench.passes import analytic_passes, method_args

H200_PEAK_TFLOPS = 989.0
"""H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet; 1979 is with sparsity)."""
CONFIGS = {"lora": ("lora", None), "bidora first_order": ("bidora", "first_order"), "bidora darts": ("bidora", "darts"),
           "bilora_sam": ("bilora_sam", None)}


def write_dataset(path, rows: int, seq: int, seed: int = 0) -> None:
    """Prompts of random words long enough to be cut to ``seq`` tokens, one-word answers."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(seq)]
            f.write(json.dumps({"prompt": " ".join(words), "response": rng.choice(["yes", "no"])}) + "\n")


def flops_per_token(model: str, seq: int) -> float:
    shape = builtin_shape(model)
    return 6 * (shape["parameters"] - shape["embedding"]) + 12 * shape["layers"] * shape["hidden"] * seq


def run_args(options, data: str) -> list[str]:
    return ["--ds_config", options.ds_config, "--model_name_or_path", options.model, "--dataset", data,
            "--max_steps", str(options.steps), "--micro_batch_size", str(options.micro_batch),
            "--gradient_accumulation_steps", "1", "--data.max_length", str(options.seq), "--data.eval_size", "4",
            "--eval_batch_size", "1", "--eval_steps", "0",
            "--adapter.rank", "16", "--adapter.alpha", "32", "--adapter.aux_rank", "16"]


def measure(options, args: list[str], ranks: int, peak_flops: float) -> list[dict]:
    per_token = flops_per_token(options.model, options.seq)
    tokens_per_step = options.micro_batch * ranks * options.seq
    rows = []
    for name, (method, hypergrad) in CONFIGS.items():
        result = train([*args, *method_args(method, hypergrad)], RUNS / f"h200_{name.replace(' ', '_')}", ranks)
        passes = analytic_passes(method, hypergrad)
        useful = tokens_per_step * per_token / result["s_per_step"]
        rows.append({"config": name, "passes": passes, **result,
                     "inner_tokens_per_s": tokens_per_step / result["s_per_step"],
                     "mfu": passes * useful / peak_flops, "useful_mfu": useful / peak_flops})
        print(f"{name}: {rows[-1]['inner_tokens_per_s']:.0f} inner tokens/s, MFU {rows[-1]['mfu']:.3f}, "
              f"peak {max(result['peak_memory_gb_per_rank']):.2f} GiB", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    return table(["config", "passes/inner step", "s/inner step", "inner tokens/s", "MFU (all passes)", "useful MFU",
                  "peak GiB/rank"],
                 [[r["config"], r["passes"], f"{r['s_per_step']:.3f}", f"{r['inner_tokens_per_s']:.0f}",
                   f"{r['mfu']:.3f}", f"{r['useful_mfu']:.3f}", f"{max(r['peak_memory_gb_per_rank']):.2f}"]
                  for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench h200", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 CPU ranks, builtin:micro-llama, 32 tokens")
    parser.add_argument("--model", default="builtin:llama-3-8b-shape")
    parser.add_argument("--ds_config", default="ds_configs/zero2_bf16.json")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="inner steps per run (the first 10 untimed)")
    parser.add_argument("--ranks", type=int, default=0, help="0: every visible GPU")
    parser.add_argument("--peak_tflops", type=float, default=H200_PEAK_TFLOPS, help="per GPU, bf16 dense")
    options = parser.parse_args(argv)
    if options.smoke:
        options.model, options.ds_config, options.seq, options.micro_batch, options.steps = (
            "builtin:micro-llama", "ds_configs/cpu_zero2.json", 32, 2, 20)
        options.ranks = options.ranks or 2
    if not options.ranks:
        import torch

        options.ranks = torch.cuda.device_count()
    info = machine()
    folder = RUNS / "h200_data"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"long_{options.seq}.jsonl"
    write_dataset(data, rows=64 * options.micro_batch * options.ranks + 4, seq=options.seq)
    args = run_args(options, str(data))
    rows = measure(options, args, options.ranks, options.ranks * options.peak_tflops * 1e12)
    path = save("h200_smoke" if options.smoke else "h200",
                {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()], "ranks": options.ranks,
                 "flops_per_token": flops_per_token(options.model, options.seq), "peak_tflops": options.peak_tflops,
                 "train_args": args, "rows": rows})
    print(markdown(rows))
    print(f"results: {path}")
