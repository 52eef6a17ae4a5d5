"""The optional kernels checked against the plain model on a GPU (issue 13 item 4).

    python -m bench gpu_kernels --out DIR          # needs CUDA; Liger rows need liger-kernel

For builtin:tiny-llama with LoRA on all seven projections (B made non-zero, so the adapters
matter), one forward and backward of a fixed batch: the loss and every adapter gradient of
``--use_liger_kernel`` (RMSNorm, RoPE, SwiGLU), ``--torch_compile`` (regional) and the chunked
and Liger fused linear cross-entropy, each against the plain model's, as relative errors, in
fp32 and bf16. Also the wall time of each variant's forward+backward (median of 10, after 3
untimed) at a larger batch. Writes DIR/gpu_kernels.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch


def adapted_model(variant: str, dtype: torch.dtype, vocab: int):
    from ds_bilevel.adapters import inject_adapters
    from ds_bilevel.adapters.config import AdapterConfig
    from ds_bilevel.builtin.model import build_builtin_model
    from ds_bilevel.kernels import apply_kernels

    model = build_builtin_model("builtin:tiny-llama", vocab, seed=0, dtype=dtype, device="cuda")
    model.config.use_cache = False
    apply_kernels(model, use_liger_kernel=variant == "liger", torch_compile=variant == "compile")
    torch.manual_seed(0)
    inject_adapters(model, AdapterConfig(method="lora", rank=8, alpha=16))
    generator = torch.Generator("cuda").manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name or name.endswith(".B"):
            param.data.copy_(torch.randn(param.shape, generator=generator, device="cuda") * 0.02)
    return model


def loss_and_grads(model, batch: dict, loss_kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from ds_bilevel.kernels import fused_linear_loss_fn
    from ds_bilevel.losses import linear_token_loss_sum, loss_sum, shifted_targets

    model.zero_grad(set_to_none=True)
    if loss_kind == "logits":
        summed = loss_sum(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"])
    else:
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weight = model.lm_head.weight
        if loss_kind == "chunked":
            summed = linear_token_loss_sum(hidden, weight, batch["labels"])
        else:
            fn = fused_linear_loss_fn()
            summed = fn(hidden.flatten(0, 1), weight, shifted_targets(batch["labels"]).flatten())
    summed.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return summed.detach().float(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_batch(vocab: int, rows: int, length: int) -> dict:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(4, vocab, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # prompt tokens are not scored
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(), "labels": labels.cuda()}


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench gpu_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    options = parser.parse_args(argv)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    from ds_bilevel.builtin.tokenizer import load_builtin_tokenizer
    from ds_bilevel.kernels import unsupported

    vocab = len(load_builtin_tokenizer())
    rows = []
    variants = [("plain", "logits"), ("plain", "chunked"), ("plain", "liger_fused"), ("liger", "logits"),
                ("compile", "logits")]
    for dtype in (torch.float32, torch.bfloat16):
        batch, big = make_batch(vocab, 2, 64), make_batch(vocab, 8, 128)
        reference = None
        for variant, loss_kind in variants:
            row = {"dtype": str(dtype).removeprefix("torch."), "kernels": variant, "loss": loss_kind}
            why = unsupported("use_liger_kernel") if "liger" in (variant, loss_kind.split("_")[0]) else None
            if why:
                rows.append({**row, "skipped": why})
                continue
            try:
                model = adapted_model(variant, dtype, vocab)
                loss, grads = loss_and_grads(model, batch, loss_kind)
                if reference is None:
                    reference = (loss, grads)
                row["loss"] = loss_kind
                row["loss_value"] = loss.item()
                row["loss_rel_err"] = relative(loss, reference[0])
                row["grad_rel_err_max"] = max(relative(grads[n], reference[1][n]) for n in reference[1])
                row["step_ms"] = 1000 * timed(lambda m=model, k=loss_kind, b=big: loss_and_grads(m, b, k))
            except Exception as error:  # recorded; the next variant still runs
                traceback.print_exc()
                row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out / "gpu_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
