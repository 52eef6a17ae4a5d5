"""One GPU benchmark: ours against HF PEFT, every method, ZeRO-2 and ZeRO-3, and the 8B shape.

    python -m bench gpu --out DIR --peak_tflops 989     # one H100 SXM or H200 (dense bf16 peak per card)
    python -m bench gpu --out DIR --smoke                # the same harness on CPU: micro-llama, 2 steps

Two launches (bench/gpu_worker.py runs several configurations in one process tree): ZeRO-2 and
ZeRO-3 (ds_configs/zero2_bf16.json, zero3_bf16.json), each with PEFT LoRA and DoRA
(bench/peft_worker.py), ours LoRA, DoRA, DoRA with its norm not detached (BiDoRA's own pass
arithmetic), BiLoRA first_order, BiDoRA first_order and darts (T1 = 1) and Bi-LoRA on
``builtin:mid-llama``; the ZeRO-2 launch ends with ours LoRA on
``builtin:llama-3-8b-shape`` (8.0B, vocabulary 128256): with the logits, and with the loss inside
the output head (``linear_cross_entropy``) with and without activation checkpointing
(``BIG_VARIANTS``). bf16, activation checkpointing unless a row says otherwise, r = 16
on all seven projections, micro batch ``--micro_batch`` of exactly ``--seq`` tokens (a generated
JSONL file), one run each. The whole tree has ``--budget_s`` (default 540 s): configurations
past it are recorded as skipped, not run. Writes DIR/gpu.json and DIR/gpu.md.

Timing skips the first ``--warmup`` steps (bench/common.py ``steady_rate``; PEFT's worker times
the same window). FLOPs and MFU: PaLM's convention (6 N + 12 L h T per token and pass, N without
the input embedding); "useful MFU" counts one pass per inner step (LoRA's work) at the measured
inner-step tokens/s, whatever the method does besides. "time / (passes x sibling)" divides a
bi-level row's seconds per inner step by its analytic passes (bench/passes.py) times the seconds
of its one-level sibling's pass (bench/methods.py: LoRA for BiLoRA and Bi-LoRA, DoRA for BiDoRA,
and for BiDoRA also "dora undetached": what is left over that is the hypergradient's overhead,
not the arithmetic of BiDoRA's pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import string
import sys
import time
from pathlib import Path

from bench.common import REPO, builtin_shape, free_port, launch_env, machine, table
from bench.methods import SIBLING
from bench.passes import analytic_passes, method_args

H100_PEAK_TFLOPS = 989.0
"""H100 SXM and H200 dense bf16 tensor-core peak (NVIDIA's datasheets; 1979 is with sparsity)."""
UNDETACHED = "dora undetached"
"""DoRA differentiating through its weight norm (BiDoRA's hypergradient needs that path): BiDoRA's pass."""
# name -> (kind, method, hypergrad, extra train.py flags): the rows of one ZeRO stage, PEFT first and
# the one-level siblings before the bi-level rows, so that a run cut by the budget keeps their ratios
CONFIGS = {
    "peft lora": ("peft", "lora", None, []), "peft dora": ("peft", "dora", None, []),
    "lora": ("ours", "lora", None, []), "dora": ("ours", "dora", None, []),
    UNDETACHED: ("ours", "dora", None, ["--adapter.detach_norm", "false"]),
    "bilora first_order": ("ours", "bilora", "first_order", []),
    "bidora first_order": ("ours", "bidora", "first_order", []),
    "bidora darts": ("ours", "bidora", "darts", []), "bilora_sam": ("ours", "bilora_sam", None, []),
}
PEER = {"lora": "peft lora", "dora": "peft dora"}
BIG_ROW = "lora 8b-shape"
BIG_VARIANTS = {
    "": [],
    # no recomputation: PaLM's MFU counts the same useful FLOPs for 4 N of work per token instead of 6 N
    # (the frozen base needs no weight gradients); ~5 MB of activations per token at 8B, which one
    # 80 GB card holds for a micro batch of 4 x 2048 once the loss is inside the head (no logits)
    " linear_cross_entropy no checkpointing": ["--linear_cross_entropy", "true", "--gradient_checkpointing", "false"],
    # the loss inside the output head: no (B, T, V) logits at 128256 tokens' vocabulary
    " linear_cross_entropy": ["--linear_cross_entropy", "true"],
}
"""The 8B rows (ZeRO-2, ours LoRA), in the order they run: name suffix -> extra train.py flags."""


def siblings(method: str) -> list[str]:
    """The one-level rows a bi-level method's pass is measured against: its sibling (bench/methods.py),
    and for BiDoRA also DoRA with the norm not detached. None for the one-level methods themselves."""
    if method in ("lora", "dora"):
        return []
    return [SIBLING[method]] + ([UNDETACHED] if method == "bidora" else [])


def write_dataset(path: Path, rows: int, seq: int, seed: int = 0) -> None:
    """Prompts of random words long enough to be cut to ``seq`` tokens, one-word answers."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(seq)]
            f.write(json.dumps({"prompt": " ".join(words), "response": rng.choice(["yes", "no"])}) + "\n")


def flops_per_token(model: str, seq: int) -> float:
    shape = builtin_shape(model)
    return 6 * (shape["parameters"] - shape["embedding"]) + 12 * shape["layers"] * shape["hidden"] * seq


def options_for(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and the runs")
    parser.add_argument("--peak_tflops", type=float, default=H100_PEAK_TFLOPS, help="per GPU, dense bf16")
    parser.add_argument("--smoke", action="store_true", help="CPU accelerator, builtin:micro-llama, 2 steps")
    parser.add_argument("--model", default="builtin:mid-llama")
    parser.add_argument("--big_model", default="builtin:llama-3-8b-shape", help="'' to leave the 8B run out")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="inner steps of each mid-size run")
    parser.add_argument("--big_steps", type=int, default=12, help="inner steps of the 8B run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (also the log interval)")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages, one launch each")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget of the whole tree")
    options = parser.parse_args(argv)
    if options.smoke:
        options.model, options.seq, options.micro_batch, options.steps, options.warmup = (
            "builtin:micro-llama", 32, 2, 2, 1)
        options.big_model, options.big_steps = ("builtin:micro-llama" if options.big_model else ""), 2
    unknown = set(options.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; allowed: {', '.join(CONFIGS)}")
    return options


def ds_config(stage: int, smoke: bool) -> str:
    return f"ds_configs/{'cpu_' if smoke else ''}zero{stage}{'' if smoke else '_bf16'}.json"


def train_args(options, model: str, steps: int, stage: int, data: Path, output_dir: Path) -> list[str]:
    return ["--ds_config", ds_config(stage, options.smoke), "--model_name_or_path", model, "--dataset", str(data),
            "--max_steps", str(steps), "--micro_batch_size", str(options.micro_batch),
            "--gradient_accumulation_steps", "1", "--data.max_length", str(options.seq), "--data.eval_size", "4",
            "--eval_batch_size", "1", "--eval_steps", "0", "--log_steps", str(options.warmup),
            "--adapter.rank", "16", "--adapter.alpha", "32", "--adapter.aux_rank", "16",
            "--output_dir", str(output_dir), "--overwrite_output_dir", "true"]


def plans(options, data: Path, out: Path, deadline: float) -> list[dict]:
    """One plan per launch: the configurations of each ZeRO stage (the 8B run closes ZeRO-2's)."""
    result = []
    for stage in (int(s) for s in options.stages.split(",")):
        configs = []
        for name in options.configs.split(","):
            kind, method, hypergrad, extra = CONFIGS[name]
            args = train_args(options, options.model, options.steps, stage, data,
                              out / "runs" / f"zero{stage}_{name.replace(' ', '_')}")
            configs.append({"name": name, "kind": kind, "method": method, "model": options.model,
                            "argv": args + (method_args(method, hypergrad) + extra if kind == "ours" else [])})
        if options.big_model and stage == 2:
            for suffix, extra in BIG_VARIANTS.items():
                folder = "zero2_8b" + suffix.replace(" ", "_")
                args = train_args(options, options.big_model, options.big_steps, stage, data, out / "runs" / folder)
                configs.append({"name": BIG_ROW + suffix, "kind": "ours", "method": "lora",
                                "model": options.big_model, "argv": args + method_args("lora") + extra})
        result.append({"group": f"zero{stage}", "stage": stage, "warmup": options.warmup, "deadline": deadline,
                       "configs": configs})
    return result


def run_plan(plan: dict, path: Path, ranks: int, env: dict, timeout: float) -> tuple[list[dict], float]:
    """Launch the worker once for ``plan``; (its rows, the launch's wall seconds)."""
    import subprocess

    plan = {**plan, "launched_at": time.time()}
    path.write_text(json.dumps(plan, indent=1))
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(REPO / "bench" / "gpu_worker.py"), str(path)]
    started = time.perf_counter()
    log = path.parent / f"{plan['group']}.log"  # written as the launch runs: a killed run still leaves its rows
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env={**launch_env(), **env}, stdout=sink,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
            failure = None if code == 0 else f"exit {code}: {(log.read_text().strip().splitlines() or [''])[-1]}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and the ranks it started
            process.wait()
            failure = "the launch ran past the time budget"
    wall = time.perf_counter() - started
    stdout = log.read_text()
    rows = [json.loads(line[len("BENCH "):]) for line in stdout.splitlines() if line.startswith("BENCH ")]
    header = rows.pop(0) if rows and "name" not in rows[0] else {}
    done = {row["name"] for row in rows}
    rows += [{"name": c["name"], "group": plan["group"], "error": failure or "no result"}
             for c in plan["configs"] if c["name"] not in done]
    for row in rows:
        row["worker_start_after_launch_s"] = header.get("worker_start_after_launch_s")
    return rows, wall


def derive(rows: list[dict], options, ranks: int) -> None:
    """Per row: tokens/s, peak GB, useful MFU and the ratios (in place)."""
    peak_flops = ranks * options.peak_tflops * 1e12
    per_token = {}
    by = {(r["group"], r["name"]): r for r in rows}
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        big = row["name"].startswith(BIG_ROW)
        model = options.big_model if big else options.model
        if model not in per_token:
            per_token[model] = flops_per_token(model, options.seq)
        row["peak_gb"] = max(row["peak_memory_gb_per_rank"])
        row["useful_mfu"] = row["tokens_per_s"] * per_token[model] / peak_flops
        kind, method, hypergrad, _ = CONFIGS.get(row["name"], ("ours", "lora", None, []))
        row["passes_per_inner_step"] = analytic_passes(method, hypergrad)
        # issue 13's "BiDoRA darts within 5% of 4 x DoRA's pass": time / (passes x the sibling's time)
        row["time_vs_passes_x_sibling"] = {}
        for name in siblings(method) if kind == "ours" and not big else []:
            sibling = by.get((row["group"], name), {})
            if "s_per_step" in sibling:
                row["time_vs_passes_x_sibling"][name] = row["s_per_step"] / (row["passes_per_inner_step"]
                                                                             * sibling["s_per_step"])
        peer = by.get((row["group"], PEER.get(row["name"], "")))
        if peer and "tokens_per_s" in peer:
            row["speed_vs_peft"] = row["tokens_per_s"] / peer["tokens_per_s"]
            row["memory_vs_peft"] = row["peak_gb"] / max(peer["peak_memory_gb_per_rank"])
        lora = by.get((row["group"], BIG_ROW if big else "lora"))  # the 8B loss-head row against the 8B logits row
        if kind == "ours" and row["name"] not in ("lora", BIG_ROW) and lora and "s_per_step" in lora:
            row["time_vs_lora"] = row["s_per_step"] / lora["s_per_step"]
            row["memory_vs_lora"] = row["peak_gb"] / max(lora["peak_memory_gb_per_rank"])


def markdown(rows: list[dict], launches: list[dict]) -> str:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    body = []
    for r in rows:
        if "tokens_per_s" not in r:
            body.append([r["group"], r["name"], r.get("skipped") or r.get("error", "?"), *[""] * 9])
            continue
        body.append([r["group"], r["name"], f"{r['tokens_per_s']:.0f}", f"{r['peak_gb']:.2f}",
                     f"{100 * r['useful_mfu']:.1f}%", fmt(r.get("speed_vs_peft"), ".2f"),
                     fmt(r.get("memory_vs_peft"), ".2f"), fmt(r.get("time_vs_lora"), ".2f"),
                     ", ".join(f"{v:.2f} ({s})" for s, v in r.get("time_vs_passes_x_sibling", {}).items()),
                     fmt(r.get("memory_vs_lora"), ".2f"), f"{r.get('outside_training_s', r['wall_s']):.1f}",
                     fmt(r.get("phases", {}).get("start_to_first_step"), ".1f")])
    main = table(["ZeRO", "run", "tokens/s", "peak GB", "useful MFU", "speed vs PEFT", "memory vs PEFT",
                  "time vs LoRA", "time / (passes x sibling)", "memory vs LoRA", "s outside training",
                  "s from main to first step"], body)
    starts = table(["launch", "wall s", "launcher + imports s (to the worker's first line)", "configurations"],
                   [[x["group"], f"{x['wall_s']:.1f}", fmt(x.get("worker_start_after_launch_s"), ".1f"), x["configs"]]
                    for x in launches])
    return main + "\n\n" + starts + "\n"


def main(argv: list[str] | None = None) -> None:
    options = options_for(argv)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if options.smoke else {}
    started = time.time()
    deadline = started + options.budget_s
    data = out / f"long_{options.seq}.jsonl"
    write_dataset(data, rows=64 * options.micro_batch * options.ranks + 4, seq=options.seq)
    rows, launches = [], []
    for plan in plans(options, data, out, deadline):
        group_rows, wall = run_plan(plan, out / f"plan_{plan['group']}.json", options.ranks, env,
                                    deadline + 30 - time.time())
        rows += group_rows
        launches.append({"group": plan["group"], "wall_s": wall, "configs": len(plan["configs"]),
                         "worker_start_after_launch_s": group_rows[0].get("worker_start_after_launch_s")
                         if group_rows else None})
        text = write_results(out, options, rows, launches, started)  # after each launch: partial results stay
    print(text)
    print(f"results: {out / 'gpu.json'}, {out / 'gpu.md'}")


def write_results(out: Path, options, rows: list[dict], launches: list[dict], started: float) -> str:
    derive(rows, options, options.ranks)
    info = machine()
    results = {"machine": info, "options": vars(options), "total_wall_s": time.time() - started,
               "launches": launches, "rows": rows, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (f"# python -m bench gpu{' --smoke' if options.smoke else ''} on {info.get('gpu', 'CPU')} "
            f"({info['date']}, commit {info['commit'][:7]}), {results['total_wall_s']:.0f} s in all\n\n"
            + markdown(rows, launches))
    (out / "gpu.md").write_text(text)
    return text
