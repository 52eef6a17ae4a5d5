"""The training-curves PNG written at the end of a run, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, out_file: Path, title: str) -> Path:
    """Losses of both levels (left) and the evaluation metrics (right) against inner steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("train_loss") is not None]
    outer = [r for r in rows if r.get("outer_loss") is not None]
    evals = [r for r in rows if "eval_loss" in r]
    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot([r["step"] for r in train], [r["train_loss"] for r in train],
                label="train loss (inner level; D1 if bi-level)")
    if outer:
        losses.plot([r["step"] for r in outer], [r["outer_loss"] for r in outer], label="outer level (D2) loss")
    losses.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", label="eval loss")
    losses.set(xlabel="inner step", ylabel="loss (per response token or example, nats)", title="losses")
    losses.legend()
    losses.grid(alpha=0.3)
    key = "eval_accuracy" if evals and "eval_accuracy" in evals[0] else "eval_exact_match"  # classifier or LM
    name = key.removeprefix("eval_").replace("_", " ")
    metrics.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:green", label=f"eval {name}")
    metrics.set(xlabel="inner step", ylabel=name, ylim=(-0.02, 1.02), title="evaluation")
    metrics.legend()
    metrics.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_file, dpi=110)
    plt.close(figure)
    return out_file
