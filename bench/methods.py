"""Cost of each method and hypergradient per inner step, as a multiple of ds_bilevel's LoRA.

    python -m bench methods [--repeats 3] [--steps 60] [--model builtin:tiny-llama]

Every configuration runs launch/train.py with the same flags (bench.common.timed_args), in
round-robin order repeated ``--repeats`` times so that outside load falls on all alike. Measured
cost: seconds per inner step (the first ``WARMUP`` untimed) over LoRA's in the same repeat;
all configurations draw global batches of the same size. Next to it the analytic cost in
passes per inner step (bench.passes, counted from ds_bilevel's schedule and hypergradients)
and the expected cost: passes x the one-pass cost of the method's one-level sibling (BiDoRA's
pass is DoRA's, BiLoRA's and Bi-LoRA's are LoRA's plus their small extras).
"""

from __future__ import annotations

import os

from bench.common import RUNS, machine, save, show, spread, table, timed_args, timed_parser, train
from bench.passes import analytic_passes, method_args

# name: (method, hypergrad, unroll steps); None for methods without an outer hypergradient.
CONFIGS = {
    "lora": ("lora", None, 1), "dora": ("dora", None, 1),
    **{f"{m} {h} T1={t}": (m, h, t) for m in ("bilora", "bidora") for h in ("first_order", "darts") for t in (1, 5)},
    "bilora_sam": ("bilora_sam", None, 1),
}
SIBLING = {"lora": "lora", "dora": "dora", "bilora": "lora", "bidora": "dora", "bilora_sam": "lora"}
PASS_TOLERANCE = 0.10
"""Target: measured cost within 10% of passes x the sibling's one-pass cost."""
BILORA_TIME, BILEVEL_MEMORY = 1.05, 1.10
"""Targets: Bi-LoRA's time and any bi-level method's peak memory as multiples of LoRA's."""


def measure(args: list[str], repeats: int, ranks: int, names: list[str], after_repeat=None) -> dict[str, list[dict]]:
    samples = {name: [] for name in names}
    for repeat in range(repeats):
        if repeat and after_repeat:
            after_repeat(samples)  # keep what is measured if a long benchmark is stopped
        for name in names:
            config = CONFIGS[name]
            load = os.getloadavg()[0]
            result = train([*args, *method_args(*config)], RUNS / f"methods_{name.replace(' ', '_')}", ranks)
            result["loadavg_1min_before"] = round(load, 2)
            samples[name].append(result)
            print(f"repeat {repeat} {name}: {result['s_per_step']:.3f} s/step, "
                  f"peak {max(result['peak_memory_gb_per_rank']):.3f} GiB, load {load:.2f}", flush=True)
    return samples


def relative(samples: dict[str, list[dict]], name: str, reference: str, key) -> dict:
    """Paired ratios over repeats: repeat i of ``name`` over repeat i of ``reference``."""
    return spread([key(a) / key(b) for a, b in zip(samples[name], samples[reference], strict=True)])


def summarise(samples: dict[str, list[dict]]) -> list[dict]:
    def seconds(s):
        return s["s_per_step"]

    def memory(s):
        return max(s["peak_memory_gb_per_rank"])

    rows = []
    for name in samples:
        method, hypergrad, unroll = CONFIGS[name]
        passes = analytic_passes(method, hypergrad, unroll)
        time_vs_lora = relative(samples, name, "lora", seconds)
        time_vs_sibling = relative(samples, name, SIBLING[method], seconds)
        memory_vs_lora = relative(samples, name, "lora", memory)
        within = abs(time_vs_sibling["median"] / passes - 1.0) <= PASS_TOLERANCE
        row = {"config": name, "passes": passes, "s_per_step": spread([seconds(s) for s in samples[name]]),
               "time_vs_lora": time_vs_lora, "time_vs_sibling": time_vs_sibling, "sibling": SIBLING[method],
               "expected_vs_lora": passes * time_vs_lora["median"] / time_vs_sibling["median"],
               "memory_vs_lora": memory_vs_lora, "within_pass_count": within}
        if method == "bilora_sam":
            row["bilora_time_met"] = time_vs_lora["median"] <= BILORA_TIME
        if method in ("bilora", "bidora", "bilora_sam"):
            row["memory_met"] = memory_vs_lora["median"] <= BILEVEL_MEMORY
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    return table(["config", "passes/inner step", "s/inner step", "time vs LoRA", "time vs sibling (sibling)",
                  "time / (passes x sibling)", "memory vs LoRA"],
                 [[r["config"], r["passes"], show(r["s_per_step"]), show(r["time_vs_lora"], 2),
                   f"{show(r['time_vs_sibling'], 2)} ({r['sibling']})",
                   f"{r['time_vs_sibling']['median'] / r['passes']:.2f}", show(r["memory_vs_lora"], 3)]
                  for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = timed_parser("methods", __doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="a comma-separated subset (with lora and the siblings); results then go to "
                             "methods_<subset>.json")
    options = parser.parse_args(argv)
    args = timed_args(options.model, options.steps, options.ds_config)
    info = machine()
    names = options.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or "lora" not in names or any(SIBLING[CONFIGS[n][0]] not in names for n in names):
        parser.error(f"--configs: {names} must be names of {list(CONFIGS)}, with lora and each one's sibling")
    result_name = "methods" if names == list(CONFIGS) else "methods_" + "_".join(n.replace(" ", "-") for n in names)

    def record(samples: dict) -> tuple[list[dict], object]:
        rows = summarise(samples)
        return rows, save(result_name, {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                                      "ranks": options.ranks, "train_args": args, "rows": rows, "samples": samples})

    rows, path = record(measure(args, options.repeats, options.ranks, names, after_repeat=record))
    print(markdown(rows))
    print(f"results: {path}")
