"""One adapted layer's forward and backward, the plain autograd form against the fused one.

    python -m bench adapter_layer [--tokens 4096] [--in_features 2048] [--out_features 2048] [--rank 16]
                                  [--methods lora,dora,bilora_sam] [--repeats 7] [--dtype fp32]

"plain" is the layer's formula as autograd ops, as the code computed it before
adapters/fused.py (LoRA: W0 x + bias + (B (A x)) s; DoRA: the same times m / ||W0 + s B A||_row
from B A, its product by s and the sum with W0; Bi-LoRA: LoRA plus s B2 A2 x through its own
gradient-reversing node); "fused" is the layer's forward now. Both run on the same layer and
input, interleaved (plain, fused, plain, ...), so that outside load falls on both alike; the
table gives the median over repeats and the paired ratio. Before timing, each method's fused
output and gradients (x and every adapter parameter) are compared with the plain ones.

``--count_ops`` also counts the aten operations of one forward and backward (each a kernel
launch on a GPU) and those whose output is activation-sized (tokens x min(in, out) elements
or more: a pass over the activations) or weight-sized (in x out or more: DoRA's norm), which
do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "reshape", "expand", "slice", "narrow", "split",
            "as_strided", "detach", "alias", "permute", "unsqueeze", "squeeze", "select", "view_as",
            "split_with_sizes", "_reshape_alias", "lift_fresh", "empty", "new_empty"}


def plain_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The method's forward as plain autograd ops, as the layers computed it before the fused node."""
    from ds_bilevel.adapters import BiLoraLayer, BiLoraSamLayer, DoraLayer
    from ds_bilevel.adapters.bilora_sam import _AscendingLowRank

    s = layer.scaling
    if isinstance(layer, BiLoraLayer):
        h = F.linear(layer.dropout(x), layer.lora_Q) * layer.lambdas()
        return layer.base_layer(x) + F.linear(h, layer.lora_P) * s
    a, b = layer.lora_A, layer.lora_B
    if isinstance(layer, DoraLayer):
        w0 = layer.base_weight()
        weight = w0 + ((b @ a) * s).to(w0.dtype)
        norm = weight.norm(p=2, dim=1)
        scale = layer.magnitude / (norm.detach() if layer.detach_norm else norm)
        out = scale * (F.linear(x, w0) + F.linear(F.linear(x, a), b) * s)
        return out if layer.base_layer.bias is None else out + layer.base_layer.bias
    x_drop = layer.dropout(x)
    out = layer.base_layer(x) + F.linear(F.linear(x_drop, a), b) * s
    if isinstance(layer, BiLoraSamLayer):
        if layer.ascend_in_backward:
            out = out + _AscendingLowRank.apply(x_drop, layer.aux_A, layer.aux_B, s)
        else:
            out = out + F.linear(F.linear(x_drop, layer.aux_A), layer.aux_B) * s
    return out


def make_layer(method: str, options, device, dtype) -> nn.Module:
    from ds_bilevel.adapters import BiDoraLayer, BiLoraLayer, BiLoraSamLayer, DoraLayer, LoraLayer

    torch.manual_seed(0)
    base = nn.Linear(options.in_features, options.out_features, bias=options.bias, device=device, dtype=dtype)
    cls = {"lora": LoraLayer, "dora": DoraLayer, "bilora_sam": BiLoraSamLayer, "bilora": BiLoraLayer,
           "bidora": BiDoraLayer}[method]
    kwargs = {"aux_rank": options.aux_rank} if method == "bilora_sam" else {}
    layer = cls(base, options.rank, 2.0 * options.rank, **kwargs)
    layer.ascend_in_backward = method == "bilora_sam"  # as the engine sets it (TrainingMode.SHARPNESS)
    with torch.no_grad():  # a trained state: B != 0, so that every gradient path is live
        for p in layer.adapter_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return layer


def step(forward, layer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    params = [x, *layer.adapter_parameters()]
    out = forward(layer, x)
    return [out.detach(), *torch.autograd.grad(out, params, grad)]


def fused_forward(layer, x):
    return layer(x)


def check(layer, x, grad) -> float:
    """Largest max|fused - plain| / max|plain| over the output and every gradient."""
    fused, plain = step(fused_forward, layer, x, grad), step(plain_forward, layer, x, grad)
    return max(float((f - p).abs().max() / p.abs().max().clamp_min(1e-30)) for f, p in zip(fused, plain, strict=True))


def count_ops(forward, layer, x, grad, big: int, weight_sized: int) -> dict[str, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "activation_sized": 0, "weight_sized": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            if name not in VIEW_OPS:
                counts["ops"] += 1
                outs = result if isinstance(result, (tuple, list)) else [result]
                size = max((t.numel() for t in outs if isinstance(t, torch.Tensor)), default=0)
                if size >= big:
                    counts["activation_sized"] += 1
                elif size >= weight_sized:
                    counts["weight_sized"] += 1
            return result

    with Counter():
        step(forward, layer, x, grad)
    return counts


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(forward, layer, x, grad, iters: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step(forward, layer, x, grad)
    synchronize(device)
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench adapter_layer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch x sequence)")
    parser.add_argument("--in_features", type=int, default=2048)
    parser.add_argument("--out_features", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16, help="r (alpha = 2r, s = 2); Bi-LoRA's primary rank")
    parser.add_argument("--aux_rank", type=int, default=8, help="Bi-LoRA's auxiliary rank")
    parser.add_argument("--bias", action="store_true", help="a base layer with a bias")
    parser.add_argument("--methods", default="lora,dora,bilora_sam",
                        help="of lora, dora, bilora_sam, bilora, bidora (BiDoRA: its norm not detached)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, plain and fused in turn")
    parser.add_argument("--iters", type=int, default=3, help="forward+backward steps per timed round")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--count_ops", action="store_true", help="also count aten ops per forward+backward")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if options.device == "auto" else options.device))
    dtype = DTYPES[options.dtype]
    rows = []
    for method in options.methods.split(","):
        layer = make_layer(method, options, device, dtype)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(options.tokens, options.in_features, device=device, dtype=dtype, generator=gen)
        x.requires_grad_(True)  # a layer inside the model: its input's gradient is needed
        grad = torch.randn(options.tokens, options.out_features, device=device, dtype=dtype, generator=gen)
        row = {"method": method, "max_rel_err": check(layer, x, grad)}
        if options.count_ops:
            big = options.tokens * min(options.in_features, options.out_features)
            weight_sized = options.in_features * options.out_features
            row["ops"] = {name: count_ops(fn, layer, x, grad, big, weight_sized)
                          for name, fn in (("plain", plain_forward), ("fused", fused_forward))}
        times = {"plain": [], "fused": []}
        timed(plain_forward, layer, x, grad, 1, device)  # warm-up
        timed(fused_forward, layer, x, grad, 1, device)
        for _ in range(options.repeats):
            for name, fn in (("plain", plain_forward), ("fused", fused_forward)):
                times[name].append(timed(fn, layer, x, grad, options.iters, device))
        ratios = [f / p for f, p in zip(times["fused"], times["plain"], strict=True)]
        row.update({"ms_plain": 1e3 * statistics.median(times["plain"]),
                    "ms_fused": 1e3 * statistics.median(times["fused"]),
                    "fused_over_plain": statistics.median(ratios),
                    "ratio_range": [min(ratios), max(ratios)], "times_s": times})
        rows.append(row)
        ops = ""
        if options.count_ops:
            o = row["ops"]
            ops = (f" | ops {o['plain']['ops']} -> {o['fused']['ops']}, activation-sized "
                   f"{o['plain']['activation_sized']} -> {o['fused']['activation_sized']}, weight-sized "
                   f"{o['plain']['weight_sized']} -> {o['fused']['weight_sized']}")
        print(f"{method:10s} plain {row['ms_plain']:8.2f} ms  fused {row['ms_fused']:8.2f} ms  "
              f"fused/plain {row['fused_over_plain']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})  "
              f"max rel err {row['max_rel_err']:.1e}{ops}", flush=True)
    meta = {"device": str(device), "dtype": options.dtype, "threads": torch.get_num_threads(),
            "shape": [options.tokens, options.in_features, options.out_features], "rank": options.rank,
            "aux_rank": options.aux_rank, "bias": options.bias, "repeats": options.repeats, "iters": options.iters}
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
