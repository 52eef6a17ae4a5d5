"""The generalisation study's choices, tables, paired comparisons and plot (bench/generalisation.py).

Every choice here reads validation accuracy only: the step of a run (best checkpoint) and the
learning rate of a configuration. Test accuracy is only reported.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

NAMES = {"lora": "LoRA", "dora": "DoRA", "bilora": "BiLoRA", "bilora_paper": "BiLoRA (paper preset)",
         "bidora": "BiDoRA", "bidora_paper": "BiDoRA (paper preset, retrained)", "bilora_sam": "Bi-LoRA"}
# The papers' claims, a > b, as paired differences.
CLAIMS = (("bilora", "lora"), ("bilora_paper", "lora"), ("bidora", "dora"), ("bidora_paper", "dora"),
          ("bilora_sam", "lora"))
RETRAINED = {"bidora_paper"}  # its model is the retraining phase's: its step is chosen among those
# Two-sided 95% quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]  # between table rows: the larger quantile


def best_point(curve: list[dict], after_step: int = 0) -> dict | None:
    """The evaluation with the best validation accuracy (ties: the lower validation loss, then the
    earlier step) among those after ``after_step``; step 0 (the untrained adapter) is never chosen."""
    points = [p for p in curve if p["step"] > after_step]
    return min(points, key=lambda p: (-p["val_acc"], p["val_loss"], p["step"])) if points else None


def selected(run: dict, max_steps: int) -> dict | None:
    """A finished run's chosen point: the early-stopped model a user would keep."""
    if run.get("failed"):
        return None
    return best_point(run["curve"], max_steps if run["config"] in RETRAINED else 0)


def choose_learning_rates(tuning: list[dict], max_steps: int) -> dict[tuple[str, str], float]:
    """Per (task, configuration): the grid rate with the best mean validation accuracy of its chosen
    points over the tuning seeds (ties: the smaller rate). A rate with a failed run is not chosen."""
    by = {}
    for run in tuning:
        point = selected(run, max_steps)
        by.setdefault((run["task"], run["config"], run["learning_rate"]), []).append(
            point["val_acc"] if point else -math.inf)
    chosen = {}
    for (task, config, lr), values in sorted(by.items()):
        score = statistics.fmean(values)
        if (task, config) not in chosen or score > chosen[task, config][1]:
            chosen[task, config] = (lr, score)
    return {key: lr for key, (lr, _) in chosen.items()}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def evaluation_table(results: dict) -> dict:
    """{(task, noise): {"seeds": [...], config: {"test", "final_test", "val", "step"}}} over the seeds
    every configuration of the cell finished (paired comparisons need the same seeds)."""
    s = results["study"]
    runs = [r for r in results["runs"] if r["stage"] == "evaluation"]
    table = {}
    for task in s["tasks"]:
        for noise in s["noises"]:
            cell = {(r["config"], r["seed"]): r for r in runs if r["task"] == task and r["noise"] == noise}
            seeds = sorted(seed for seed in range(s["seeds"])
                           if all(selected(cell.get((c, seed), {"failed": True}), s["max_steps"]) is not None
                                  for c in s["configs"]))
            row = {"seeds": seeds}
            for config in s["configs"]:
                points = [selected(cell[config, seed], s["max_steps"]) for seed in seeds]
                finals = [cell[config, seed]["curve"][-1]["test_acc"] for seed in seeds]
                row[config] = {"test": [p["test_acc"] for p in points], "val": [p["val_acc"] for p in points],
                               "step": [p["step"] for p in points], "final_test": finals}
            table[task, noise] = row
    return table


def paired(table: dict) -> list[dict]:
    """The claims as paired test-accuracy differences, per task and noise level."""
    out = []
    for (task, noise), row in table.items():
        for a, b in CLAIMS:
            if a not in row or b not in row or not row["seeds"]:
                continue
            diffs = [x - y for x, y in zip(row[a]["test"], row[b]["test"], strict=True)]
            mean, half = mean_ci(diffs)
            p_value = None
            if len(diffs) > 1 and statistics.stdev(diffs) > 0:
                try:
                    from scipy.stats import ttest_1samp

                    p_value = float(ttest_1samp(diffs, 0.0).pvalue)  # two-sided paired t-test
                except ImportError:
                    pass
            out.append({"task": task, "noise": noise, "claim": f"{NAMES[a]} > {NAMES[b]}", "a": a, "b": b,
                        "mean_diff": mean, "ci95": half, "wins": sum(d > 0 for d in diffs),
                        "ties": sum(d == 0 for d in diffs), "seeds": len(diffs), "p_value": p_value,
                        "by_seed": diffs})
    return out


def pct(mean_half: tuple[float, float]) -> str:
    return f"{mean_half[0] * 100:.1f} ± {mean_half[1] * 100:.1f}"


def markdown(results: dict, table: dict, claims: list[dict]) -> str:
    s, w = results["study"], results["world"]
    chosen = {(c["task"], c["config"]): c["learning_rate"] for c in results["chosen"]}
    lines = [
        "# Generalisation study (issue #14)", "",
        "Generated by `python -m bench generalisation`; every number is measured by that run.", "",
        f"Tasks: sentiment of \"noun is adjective [fillers]\" ({s['negation']:.0%} negated) as the next word of a "
        f"causal LM (decoder: {w['model']}'s architecture, {w['num_hidden_layers']} layers) and as the class of a "
        "RoBERTa encoder with a classification head (encoder: builtin:tiny-roberta's architecture), both "
        f"pre-trained here on {w['pretrain_sentences']} synthetic sentences ({w['pretrain_steps']} steps). "
        f"Per run: {s['n_train']} training examples (the bi-level methods' D1 + D2, split_ratio 0.8) and "
        f"{s['n_val']} validation examples, held out of the same file and noisy like it; a clean test set of "
        f"{s['n_test']}.", "",
        "Frozen bases (linear probe of the sentiment on the state the task reads, 256 fit / 400 test): "
        + "; ".join(f"{task} {p['linear_probe_accuracy']:.1%}" for task, p in results["pretraining"].items())
        + (f"; decoder zero-shot exact match {results['pretraining']['decoder']['zero_shot_exact_match']:.1%}"
           if "decoder" in results["pretraining"] else "") + ".", "",
        f"Protocol: {s['max_steps']} inner steps of {s['micro_batch_size']} examples, evaluation of validation and "
        f"test every {s['eval_steps']} steps; the reported test accuracy is at the step of best validation accuracy "
        "(early stopping for every method alike; BiDoRA's preset: among its retraining steps, whose model it "
        f"returns). Learning rate per (task, configuration) chosen on {s['tuning_seeds']} tuning seeds of their own "
        f"at {s['tuning_noise']:.0%} noise by mean validation accuracy; then {s['seeds']} evaluation seeds per "
        "noise level at that rate (each seed: its own examples, flipped labels, adapter init). One CPU rank, "
        f"fp32, ZeRO-{s['zero_stage']}. Project defaults: rank matched to LoRA r={s['base_rank']} on all linear "
        f"layers, alpha {s['alpha']}, darts. Presets: ds_bilevel/presets/*.yaml (their rank, targets q/v, "
        "optimiser), with the grid's rate and their other rates in proportion; BiDoRA's preset retrains for "
        f"{s['retrain_share']:g} x the search steps.", "",
        "## Learning rates", "",
        "| configuration | grid | " + " | ".join(f"chosen ({t})" for t in s["tasks"]) + " |",
        "|---|---|" + "---|" * len(s["tasks"]),
    ]
    for config in s["configs"]:
        grid = results["grids"][config]
        marks = []
        for task in s["tasks"]:
            lr = chosen.get((task, config))
            edge = lr is not None and len(grid) > 1 and lr in (grid[0], grid[-1])
            marks.append("n/a" if lr is None else f"{lr:g}" + (" (grid edge)" if edge else ""))
        lines.append(f"| {NAMES[config]} | {', '.join(f'{g:g}' for g in grid)} | " + " | ".join(marks) + " |")
    for task in s["tasks"]:
        budgets = results["budgets"][task]
        lines += ["", f"## {task}: clean test accuracy %, mean ± 95% CI over seeds", "",
                  "| configuration | rank, targets | adapter params | "
                  + " | ".join(f"noise {n:.0%}" for n in s["noises"]) + " | "
                  + " | ".join(f"no early stop, {n:.0%}" for n in s["noises"]) + " |",
                  "|---|---|---|" + "---|" * (2 * len(s["noises"]))]
        for config in s["configs"]:
            b = budgets[config]
            cells = [pct(mean_ci(table[task, n][config]["test"])) if table[task, n]["seeds"] else "n/a"
                     for n in s["noises"]]
            finals = [pct(mean_ci(table[task, n][config]["final_test"])) if table[task, n]["seeds"] else "n/a"
                      for n in s["noises"]]
            lines.append(f"| {NAMES[config]} | r={b['rank']}, {b['targets']} | {b['inference']:,} | "
                         + " | ".join(cells + finals) + " |")
        lines.append("")
        lines.append("Seeds per noise level: " + ", ".join(f"{n:.0%}: {len(table[task, n]['seeds'])}"
                                                          for n in s["noises"]) + ".")
    lines += ["", "## The papers' claims: paired test-accuracy differences (same seed, same data), pp", "",
              "| task | noise | claim | mean ± 95% CI | seeds won / tied / total | paired t-test p |",
              "|---|---|---|---|---|---|"]
    for c in claims:
        p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3f}"
        lines.append(f"| {c['task']} | {c['noise']:.0%} | {c['claim']} | {c['mean_diff'] * 100:+.1f} ± "
                     f"{c['ci95'] * 100:.1f} | {c['wins']} / {c['ties']} / {c['seeds']} | {p} |")
    runs = results["runs"]
    spent = sum(r.get("wall_s", 0) for r in runs)
    failed = sum(bool(r.get("failed")) for r in runs)
    lines += ["", f"Runs: {len(runs)} ({failed} failed); {spent / 3600:.2f} h of run time in the workers (sum), "
              f"{results['wall_s'] / 60:.1f} min for the invocation that wrote this file (cached runs are not "
              f"re-run), {s['workers']} workers on a 2-core machine."]
    return "\n".join(lines) + "\n"


def plot(results: dict, table: dict, claims: list[dict], path: Path) -> Path:
    """Top: test accuracy against the noise level, per configuration. Bottom: the claims' paired
    differences with their 95% intervals (above 0: the bi-level or ascent method is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["study"]
    fig, axes = plt.subplots(2, len(s["tasks"]), figsize=(7 * len(s["tasks"]), 9), squeeze=False)
    for column, task in enumerate(s["tasks"]):
        ax = axes[0][column]
        noises = [n for n in s["noises"] if table[task, n]["seeds"]]
        for i, config in enumerate(s["configs"]):
            stats = [mean_ci(table[task, n][config]["test"]) for n in noises]
            offset = (i - len(s["configs"]) / 2) * 0.6  # side by side at each noise level
            ax.errorbar([n * 100 + offset for n in noises], [m * 100 for m, _ in stats],
                        yerr=[h * 100 for _, h in stats], marker="o", ms=4, capsize=3, label=NAMES[config],
                        color=f"C{i}")
        ax.set_xlabel("flipped training labels (%)")
        ax.set_ylabel("clean test accuracy (%), early-stopped on validation")
        ax.set_title(f"{task}: mean ± 95% CI over seeds")
        ax.grid(alpha=0.3)
        ax = axes[1][column]
        mine = [c for c in claims if c["task"] == task]
        names = list(dict.fromkeys(c["claim"] for c in mine))
        for i, name in enumerate(names):
            rows = [c for c in mine if c["claim"] == name]
            offset = (i - len(names) / 2) * 0.8
            ax.errorbar([c["noise"] * 100 + offset for c in rows], [c["mean_diff"] * 100 for c in rows],
                        yerr=[c["ci95"] * 100 for c in rows], marker="s", ms=4, capsize=3, label=name,
                        color=f"C{i}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("flipped training labels (%)")
        ax.set_ylabel("paired test-accuracy difference (pp)")
        ax.set_title(f"{task}: the papers' claims, mean ± 95% CI (> 0: claim holds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> list[Path]:
    """generalisation.{json,md,png} in ``out``; a hand-written "## Reading" section of the previous
    markdown is kept as is (re-check it when the numbers change)."""
    out.mkdir(parents=True, exist_ok=True)
    table = evaluation_table(results)
    claims = paired(table)
    keyed = {f"{task}@{noise:g}": row for (task, noise), row in table.items()}
    json_path, md_path = out / "generalisation.json", out / "generalisation.md"
    # Compact: every run's curve is in it (the cache a later study resumes from), ~1 kB per run.
    json_path.write_text(json.dumps({**results, "table": keyed, "claims": claims}, separators=(",", ":")) + "\n")
    reading = ""
    if md_path.is_file() and "\n## Reading" in md_path.read_text():
        reading = "\n## Reading" + md_path.read_text().split("\n## Reading", 1)[1]
    md_path.write_text(markdown(results, table, claims) + reading)
    return [json_path, md_path, plot(results, table, claims, out / "generalisation.png")]
