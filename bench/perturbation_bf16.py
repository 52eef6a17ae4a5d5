"""How much of the central-difference J.v survives bf16 compute weights (issue 12, item 7).

The hypergradients' second-order products move the inner weights to w +- t u and difference
the gradients there (hypergrad/problem.py). Under bf16 the engine writes w +- t u into bf16
compute weights (engine.perturb_inner -> zero_access.write_compute_weight): entries whose
move is below half the bf16 spacing of the weight round back, and the applied difference is
not 2 t u. This benchmark measures the resulting error of J.v = d2 L_tr / dm dw . v on BiDoRA
(r = 16 on all seven projections, the direction inner, the magnitude outer) at LLaMA widths,
against the same product with fp32 weights and today's absolute step (the fp32 run):

- ``round``: the perturbed inner weights rounded to bf16, everything else as in fp32: the
  perturbation's rounding alone (the issue's one-layer emulation);
- ``bf16``: the whole block in bf16, as DeepSpeed's bf16 runs it (rounding of the perturbation
  plus bf16 arithmetic in the two gradients);
- ``fp32``: fp32 weights with the same step: the truncation error of the larger step alone.

Step rules: ``absolute`` (today: radius eps = 0.01, DARTS/Betty) and ``relative:RHO`` (radius
max(eps, RHO * ||w||), ||w|| the norm of all inner weights). ``default`` is whatever
``hypergrad.problem.perturbation_radius`` ships for bf16.

    python -m bench perturbation_bf16 --shape mid-llama --layers 1 2 4
    python -m bench perturbation_bf16 --shape llama-3-8b-shape --layers 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "perturbation_bf16.json"


def build(shape: str, layers: int, rank: int, b_std: float, seed: int):
    from transformers import LlamaConfig, LlamaModel

    from ds_bilevel.adapters import AdapterConfig, inject_adapters
    from ds_bilevel.adapters.config import LLAMA_TARGETS
    from ds_bilevel.builtin.model import BUILTIN_MODELS
    from ds_bilevel.levels import Level, adapter_layers, level_parameters

    torch.manual_seed(seed)
    kwargs = dict(BUILTIN_MODELS[shape], num_hidden_layers=layers, vocab_size=32)
    model = LlamaModel(LlamaConfig(**kwargs)).eval()
    inject_adapters(model, AdapterConfig(method="bidora", rank=rank, alpha=2.0 * rank,
                                         target_modules=list(LLAMA_TARGETS)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # bf16 values, as a bf16 checkpoint's frozen base
            param.copy_(param.bfloat16().float())
        for _, layer in adapter_layers(model):  # a trained state: B != 0, m moved off ||W0||
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * b_std)
            layer.magnitude.mul_(1 + 0.01 * torch.randn(layer.magnitude.shape, generator=gen))
            layer.magnitude.copy_(layer.magnitude.bfloat16().float())
    return model, level_parameters(model, Level.INNER), level_parameters(model, Level.OUTER)


def gradients(model, inner, outer, batch, target):
    model.zero_grad(set_to_none=True)
    out = model(inputs_embeds=batch.to(next(model.parameters()).dtype)).last_hidden_state.float()
    ((out - target).square().mean()).backward()
    grads = [(p.grad.float().clone() if p.grad is not None else torch.zeros(p.shape)) for p in inner + outer]
    return grads[:len(inner)], grads[len(inner):]


@torch.no_grad()
def write(inner, values, round_to_bf16: bool):
    for param, value in zip(inner, values, strict=True):
        param.copy_(value.bfloat16() if round_to_bf16 else value)


def mixed_product(model, inner, outer, masters, v, radius, mode, d1):
    """J v by central differences at masters +- (radius / ||v||) v, in ``mode``."""
    step = radius / math.sqrt(sum(float(x.double().square().sum()) for x in v))
    rounded = mode in ("round", "bf16")
    out = []
    for sign in (1, -1):
        write(inner, [m + sign * step * d for m, d in zip(masters, v, strict=True)], rounded)
        out.append(gradients(model, inner, outer, *d1)[1])
    write(inner, masters, False)
    return [(p - m) / (2 * step) for p, m in zip(*out, strict=True)]


def relative(a, b):
    num = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True)))
    return num / math.sqrt(sum(float(y.double().square().sum()) for y in b))


def measure(shape, layers, rank, rules, modes, tokens, b_std, seed, eps=0.01):
    from ds_bilevel.hypergrad.problem import perturbation_radius

    model, inner, outer = build(shape, layers, rank, b_std, seed)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed + 2)
    d1, d2 = [(torch.randn(1, tokens, hidden, generator=gen), torch.randn(1, tokens, hidden, generator=gen))
              for _ in range(2)]
    masters = [p.detach().clone() for p in inner]
    n_inner = sum(p.numel() for p in inner)
    w_norm = math.sqrt(sum(float(m.double().square().sum()) for m in masters))
    v, _ = gradients(model, inner, outer, *d2)
    reference = mixed_product(model, inner, outer, masters, v, eps, "fp32", d1)  # the fp32 run, today's step
    if "bf16" in modes:
        import copy

        from ds_bilevel.levels import Level, level_parameters

        model_bf16 = copy.deepcopy(model).bfloat16()
        inner_bf16, outer_bf16 = (level_parameters(model_bf16, level) for level in (Level.INNER, Level.OUTER))
    rows = []
    for rule in rules:
        if rule == "absolute":
            radius = eps
        elif rule == "default":
            radius = float(perturbation_radius(eps, torch.tensor(w_norm), torch.bfloat16))
        else:
            radius = max(eps, float(rule.split(":")[1]) * w_norm)
        row = {"shape": shape, "layers": layers, "rank": rank, "n_inner": n_inner, "w_norm": w_norm,
               "rule": rule, "radius": radius}
        for mode in modes:
            if mode == "bf16":  # fp32 masters, as DeepSpeed keeps them; a bf16 copy of the block computes
                row[mode] = relative(mixed_product(model_bf16, inner_bf16, outer_bf16, masters, v, radius, mode, d1),
                                     reference)
            else:
                row[mode] = relative(mixed_product(model, inner, outer, masters, v, radius, mode, d1), reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench perturbation_bf16", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="mid-llama", help="a builtin shape (ds_bilevel/builtin/model.py)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4],
                        help="decoder layers in the measured block, one measurement per count")
    parser.add_argument("--rank", type=int, default=16, help="BiDoRA rank r on all seven projections")
    parser.add_argument("--rules", nargs="+", default=["absolute", "relative:0.001", "relative:0.003",
                                                        "relative:0.01", "default"],
                        help="step rules: absolute (radius eps), relative:RHO (max(eps, RHO ||w||)), default "
                             "(hypergrad.problem.perturbation_radius for bf16)")
    parser.add_argument("--modes", nargs="+", default=["fp32", "round", "bf16"], choices=["fp32", "round", "bf16"],
                        help="fp32: fp32 weights, the same step; round: the perturbed inner weights rounded to bf16; "
                             "bf16: the whole block in bf16")
    parser.add_argument("--tokens", type=int, default=16,
                        help="tokens per batch (one D1 and one D2 batch of random hidden states)")
    parser.add_argument("--b_std", type=float, default=0.005, help="std of the trained-state B factors")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, factors and input")
    parser.add_argument("--output", default=str(RESULTS), help="JSON file the rows are written to")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    rows = [row for layers in args.layers for row in measure(args.shape, layers, args.rank, args.rules, args.modes,
                                                              args.tokens, args.b_std, args.seed)]
    output = Path(args.output)
    previous = json.loads(output.read_text()) if output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(previous + [{"argv": argv, "seconds": time.time() - start, "rows": rows}], indent=1))
    print(f"{'shape':18s} {'layers':>6s} {'n_inner':>9s} {'rule':>15s} {'radius':>8s} {'fp32':>8s} {'round':>8s} "
          f"{'bf16':>8s}")
    for r in rows:
        print(f"{r['shape']:18s} {r['layers']:6d} {r['n_inner']:9d} {r['rule']:>15s} {r['radius']:8.3g}"
              + "".join(f" {r.get(m, float('nan')):8.2%}" for m in ("fp32", "round", "bf16")))
