"""The loss at a real vocabulary: the logits' loss against the loss inside the output head.

    python -m bench loss_memory [--vocab 128256 --hidden 512 --tokens 2048 --dtype fp32 --repeats 3]

One training forward and backward of a 2-layer LLaMA with LoRA on all projections, at
LLaMA-3's vocabulary: once with the model's logits and ``losses.token_loss_sum`` (what a run
does by default), once with ``linear_cross_entropy`` (loss_head.py: the loss computed inside
the output head, no (B, T, V) logits). Each mode runs in a fresh process, alternating, and the
peak is the process's maximum resident memory (``ru_maxrss``) above its resident memory once
the model and batch are built, so it counts what the step itself allocates. Also the step's
time (the median of ``--steps`` steps after one warm-up). Writes bench/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from bench.common import RESULTS, machine

MODES = ("logits", "linear_cross_entropy")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(mode: str, vocab: int, hidden: int, tokens: int, dtype: str, steps: int) -> dict:
    """One mode in this process: {"peak_mb": step's peak RSS above the built model, "s_per_step"}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_bilevel.adapters import AdapterConfig, inject_adapters
    from ds_bilevel.loss_head import install_loss_head
    from ds_bilevel.losses import token_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    inject_adapters(model, AdapterConfig(method="lora", rank=16, target_modules=["all-linear"]))
    head = install_loss_head(model) if mode == "linear_cross_entropy" else None
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))

    def step() -> torch.Tensor:
        if head is None:
            loss = token_loss_sum(model(input_ids=ids).logits, ids)
        else:
            with head.scoring(ids):
                loss = model(input_ids=ids).logits
        loss.backward()
        return loss.detach()

    base = _rss_mb()
    losses, times = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        losses.append(float(step()))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak - base, "s_per_step": statistics.median(times[1:]), "loss": losses[0]}


def options_for(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench loss_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (LLaMA-3: 128256)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the 2-layer model")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the batch (one sequence)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's dtype")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per mode, alternating")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one measurement
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = options_for(argv)
    shape = ["--vocab", str(options.vocab), "--hidden", str(options.hidden), "--tokens", str(options.tokens),
             "--dtype", options.dtype, "--steps", str(options.steps)]
    if options.mode:
        print(json.dumps(measure(options.mode, options.vocab, options.hidden, options.tokens, options.dtype,
                                 options.steps)))
        return 0
    runs = {mode: [] for mode in MODES}
    for _ in range(options.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "bench.loss_memory", *shape, "--mode", mode],
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    summary = {mode: {key: statistics.median(r[key] for r in rows) for key in ("peak_mb", "s_per_step")}
               for mode, rows in runs.items()}
    logits, head = summary["logits"], summary["linear_cross_entropy"]
    result = {"machine": machine(), "options": {k: v for k, v in vars(options).items() if k != "mode"},
              "runs": runs, "median": summary, "memory_ratio": head["peak_mb"] / logits["peak_mb"],
              "time_ratio": head["s_per_step"] / logits["s_per_step"],
              "loss_rel_diff": abs(runs["linear_cross_entropy"][0]["loss"] - runs["logits"][0]["loss"])
              / abs(runs["logits"][0]["loss"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss_memory.json").write_text(json.dumps(result, indent=1))
    logits_mb = options.tokens * options.vocab * (4 if options.dtype == "fp32" else 2) / 2**20
    print(f"{options.tokens} tokens x {options.vocab} vocabulary, {options.dtype} (logits alone {logits_mb:.0f} MB):")
    for mode in MODES:
        print(f"  {mode:22s} step peak {summary[mode]['peak_mb']:7.0f} MB   {summary[mode]['s_per_step']:.3f} s/step")
    print(f"  loss head / logits: memory {result['memory_ratio']:.2f}x, time {result['time_ratio']:.2f}x, "
          f"loss relative difference {result['loss_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
