"""``python -m bench NAME [options]``: run one benchmark (``python -m bench --help`` lists them).

Benchmarks are imported only when run, so listing them needs neither DeepSpeed nor PEFT.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "peer": ("bench.peer:main", "ds_bilevel LoRA/DoRA vs HF PEFT on the same DeepSpeed set-up: tokens/s, memory"),
    "methods": ("bench.methods:main", "cost of every method/hypergradient per inner step vs LoRA, next to its passes"),
    "zero3_scaling": ("bench.zero3_scaling:main", "ZeRO-3 per-rank memory of the frozen base on 1 vs 2 ranks"),
    "scale7b": ("bench.scale7b:main", "the LLaMA-2-7B-shaped BiDoRA darts step under ZeRO-3 on 2 CPU ranks"),
    "gpu": ("bench.gpu:main", "one GPU run: ours vs PEFT, every method, ZeRO-2/3, the 8B shape (--smoke: CPU)"),
    "gpu_kernels": ("bench.gpu_kernels:main", "Liger, torch.compile, chunked/fused loss vs the plain model (CUDA)"),
    "loss_memory": ("bench.loss_memory:main", "logits loss vs linear_cross_entropy at a 128k vocabulary: memory"),
    "memory_estimate": ("bench.memory_estimate:main", "per-GPU memory estimate at LLaMA scale from shapes"),
    "generalisation": ("bench.generalisation:main", "the generalisation study (bi-level vs one-level)"),
    "adapter_layer": ("bench.adapter_layer:main",
                      "one adapted layer's forward+backward: the plain autograd form vs the fused node"),
    "step_ops": ("bench.step_ops:main", "aten ops (GPU kernel launches) per optimizer step, ours vs PEFT and per "
                 "method, by the code that issues them"),
    "perturbation_bf16": ("bench.perturbation_bf16:main",
                          "J.v error of the central differences with bf16 compute weights, per step rule"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name:{width}s}  {summary}" for name, (_, summary) in BENCHMARKS.items()]
    return "usage: python -m bench NAME [options]   (python -m bench NAME --help: its options)\n\nbenchmarks:\n" + \
        "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module, function = BENCHMARKS[name][0].split(":")
    getattr(importlib.import_module(module), function)(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
