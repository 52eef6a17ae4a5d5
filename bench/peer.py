"""ds_bilevel's LoRA and DoRA against HF PEFT's on the same DeepSpeed set-up: speed and memory.

    python -m bench peer [--repeats 3] [--steps 60] [--model builtin:tiny-llama] [--ranks 2]

Both sides get the same train.py flags (bench/peft_worker.py reads them too): the same model,
data, sequence length, micro batch, accumulation, ZeRO stage, bf16 and activation
checkpointing. Runs alternate peer, ours, peer, ours, ... so that load from other processes on
the machine falls on both alike; the load average is recorded before every run. Timing skips
the first ``WARMUP`` steps; memory is each rank's peak (ru_maxrss on CPU, max allocated on GPU).
"""

from __future__ import annotations

import os

from bench.common import (
    REPO,
    RUNS,
    WARMUP,
    last_json_line,
    launch,
    machine,
    save,
    show,
    spread,
    table,
    timed_args,
    timed_parser,
    train,
)


def run_peer(method: str, args: list[str], ranks: int) -> dict:
    stdout = launch(REPO / "bench" / "peft_worker.py", [*args, "--peft_method", method, "--warmup", str(WARMUP)], ranks)
    return last_json_line(stdout)


def measure(methods: list[str], args: list[str], repeats: int, ranks: int) -> dict:
    samples = {(side, m): [] for m in methods for side in ("peer", "ours")}
    for repeat in range(repeats):
        for method in methods:
            for side in ("peer", "ours"):
                load = os.getloadavg()[0]
                if side == "peer":
                    result = run_peer(method, args, ranks)
                else:
                    result = train([*args, "--method", method], RUNS / f"peer_ours_{method}", ranks)
                result["loadavg_1min_before"] = round(load, 2)
                samples[(side, method)].append(result)
                print(f"repeat {repeat} {side:4s} {method}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"peak {max(result['peak_memory_gb_per_rank']):.3f} GiB, load {load:.2f}", flush=True)
    return samples


def summarise(samples: dict, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        peer, ours = samples[("peer", method)], samples[("ours", method)]
        speed = {side: spread([s["tokens_per_s"] for s in runs]) for side, runs in (("peer", peer), ("ours", ours))}
        memory = {side: spread([max(s["peak_memory_gb_per_rank"]) for s in runs])
                  for side, runs in (("peer", peer), ("ours", ours))}
        # Paired ratios: repeat i of ours against repeat i of the peer, run next to it.
        speed_ratio = spread([o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(ours, peer, strict=True)])
        memory_ratio = spread([max(o["peak_memory_gb_per_rank"]) / max(p["peak_memory_gb_per_rank"])
                               for o, p in zip(ours, peer, strict=True)])
        rows.append({"method": method, "tokens_per_s": speed, "peak_gib": memory, "speed_ratio": speed_ratio,
                     "memory_ratio": memory_ratio, "speed_met": speed_ratio["median"] >= 1.0,
                     "memory_met": memory_ratio["median"] <= 1.0})
    return rows


def markdown(rows: list[dict]) -> str:
    return table(["method", "peer tokens/s", "ours tokens/s", "ours/peer speed", "peer peak GiB/rank",
                  "ours peak GiB/rank", "ours/peer memory"],
                 [[r["method"], show(r["tokens_per_s"]["peer"], 0), show(r["tokens_per_s"]["ours"], 0),
                   show(r["speed_ratio"], 3), show(r["peak_gib"]["peer"], 3), show(r["peak_gib"]["ours"], 3),
                   show(r["memory_ratio"], 3)] for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = timed_parser("peer", __doc__)
    parser.add_argument("--methods", default="lora,dora",
                        help="comma-separated methods run by both ds_bilevel and HF PEFT (lora, dora)")
    options = parser.parse_args(argv)
    methods = options.methods.split(",")
    args = timed_args(options.model, options.steps, options.ds_config)
    info = machine()
    samples = measure(methods, args, options.repeats, options.ranks)
    rows = summarise(samples, methods)
    results = {"machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()], "ranks": options.ranks,
               "train_args": args, "rows": rows,
               "samples": {f"{side}/{method}": runs for (side, method), runs in samples.items()}}
    path = save("peer", results)
    print(markdown(rows))
    print(f"results: {path}")
