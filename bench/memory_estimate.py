"""Per-GPU memory estimate of a ds_bilevel run under ZeRO-3, from the model's shapes.

    python -m bench memory_estimate            # the table in docs/usage.md ("LLaMA-scale")

Counted (bytes per GPU, N GPUs, bf16 compute, activation checkpointing, micro batch b,
sequence T):
- frozen base: 2 P / N (bf16 weights, partitioned);
- adapters: 16 bytes per adapter parameter / N (bf16 weight 2 + bf16 grad 2 + fp32 master 4
  + Adam moments 8), plus the hypergradient's full fp32 copies on every rank (darts: the
  outer gradient v and the saved masters, 2 x 4 bytes per inner parameter);
- live gathered parameters: stage3_max_live_parameters (1e9 in the shipped configs) x 2 bytes,
  an upper bound, and the largest single tensor (the embedding) when it exceeds it;
- activations: checkpointed layer inputs b T h x 2 bytes x layers, plus one layer recomputed
  in backward (about b T (10 h + 3 i) x 2 bytes), plus the fp32 logits and their gradient
  b T V x 8 bytes.
Not counted: the CUDA context and allocator fragmentation (add 1-3 GB), communication buffers.
"""

from __future__ import annotations

GB = 1024**3
MODELS = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256),
}


def parameters(hidden, inter, layers, heads, kv, vocab):
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + hidden * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter
    return layers * (attention + mlp + 2 * hidden) + 2 * vocab * hidden + hidden


def lora_parameters(hidden, inter, layers, heads, kv, vocab, rank=16):
    kv_out = kv * (hidden // heads)
    shapes = [(hidden, hidden), (hidden, kv_out), (hidden, kv_out), (hidden, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]  # q k v o gate up down (in, out)
    return layers * sum(rank * (i + o) for i, o in shapes)


def estimate(name, gpus, micro=1, seq=2048, rank=16, max_live=1e9):
    shape = MODELS[name]
    hidden, inter, layers, _, _, vocab = shape
    base = 2 * parameters(*shape) / gpus
    adapter_params = lora_parameters(*shape, rank=rank)
    adapters = 16 * adapter_params / gpus + 8 * adapter_params
    live = 2 * max(max_live, vocab * hidden)
    activations = micro * seq * (hidden * 2 * layers + (10 * hidden + 3 * inter) * 2 + vocab * 8)
    return {"params_B": parameters(*shape) / 1e9, "adapter_M": adapter_params / 1e6, "base": base / GB,
            "adapters": adapters / GB, "live": live / GB, "activations": activations / GB,
            "total": (base + adapters + live + activations) / GB}


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m bench memory_estimate", description=__doc__.split("\n\n")[0] + " Prints "
                            "docs/usage.md's table (LoRA r=16 on the seven projections, micro batch 1, 2048 tokens, "
                            "bf16, activation checkpointing, darts); every term is documented in "
                            "bench/memory_estimate.py.").parse_args(argv)
    print("| model | GPUs | params | LoRA r=16 params | base | adapters + hypergrad | gathered | activations | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, gpus in [("llama-2-7b", 8), ("llama-3-8b", 8), ("llama-3-70b", 8), ("llama-3-70b", 32)]:
        e = estimate(name, gpus)
        print(f"| {name} | {gpus} | {e['params_B']:.1f}B | {e['adapter_M']:.0f}M | {e['base']:.1f} GB | "
              f"{e['adapters']:.1f} GB | {e['live']:.1f} GB | {e['activations']:.1f} GB | {e['total']:.1f} GB |")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
