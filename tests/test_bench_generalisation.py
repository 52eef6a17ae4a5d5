"""The generalisation study's own pieces (bench/generalisation*.py); one short run of its worker."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from bench.generalisation import (
    GRIDS,
    Cell,
    StudyConfig,
    evaluation_cells,
    matched_ranks,
    parameter_counts,
    train_argv,
    tuning_cells,
    write_task_files,
)
from bench.generalisation_report import (
    T975,
    best_point,
    choose_learning_rates,
    evaluation_table,
    mean_ci,
    paired,
    selected,
)
from bench.generalisation_task import WorldConfig, encode, make_lexicon, make_task, pretraining_sentence

LEX = make_lexicon(WorldConfig())


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_task_has_the_stated_label_noise_and_a_clean_test_set(seed):
    train, test = make_task(LEX, 128, 200, 0.25, seed)
    noisy = [e for e in train if e["noisy"]]
    assert len(train) == 128 and len(test) == 200
    assert len(noisy) == 32  # exactly round(0.25 * 128)
    assert all(e["label"] != e["clean_label"] for e in noisy)
    assert all(e["label"] == e["clean_label"] for e in train if not e["noisy"])
    assert all(set(e) == {"text", "label"} for e in test)
    assert 0.3 < sum(e["label"] for e in test) / len(test) < 0.7  # both classes well represented


def test_label_follows_adjective_sentiment_and_negation():
    for example in make_task(LEX, 64, 64, 0.0, 2)[1]:
        words = example["text"].split()
        adjective = next(w for w in words if w in LEX.positive + LEX.negative)
        positive = (adjective in LEX.positive) != (LEX.function["not"] in words)
        assert example["label"] == int(positive)


def test_label_words_occur_in_pretraining_only_after_the_newline_frame():
    rng, w, framed = random.Random(0), LEX.function, 0
    for _ in range(1000):
        sentence = pretraining_sentence(LEX, rng, 0.3)
        head, newline, tail = sentence.partition("\n")
        assert not set(LEX.labels) & set(head.split())  # never where the task puts its label
        if newline:
            framed += 1
            adjective = next(x for x in head.split() if x in LEX.positive + LEX.negative)
            assert tail == f"{w['it']} {w['is']} {LEX.labels[int(adjective in LEX.positive)]}"
    assert 200 < framed < 400  # about label_share of the corpus


def test_pretraining_encoding_matches_the_recipes_label_pieces():
    from ds_bilevel.builtin.tokenizer import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    ids = encode(tokenizer, f"ba {LEX.function['is']} {LEX.positive[0]}\n{LEX.labels[1]}")
    prompt = tokenizer(f"ba {LEX.function['is']} {LEX.positive[0]}\n").input_ids
    label = tokenizer(LEX.labels[1], add_special_tokens=False).input_ids  # as ds_bilevel.data.tokenize
    assert ids == prompt + label + [tokenizer.eos_token_id]



# ---- choices read validation only ---------------------------------------------------------------

def _curve(*points):
    return [{"step": s, "val_acc": v, "val_loss": loss, "test_acc": t, "test_loss": 0.0} for s, v, loss, t in points]


def test_best_point_is_the_best_validation_accuracy_then_loss_never_step_0():
    curve = _curve((0, 0.9, 0.1, 0.5), (10, 0.7, 0.5, 0.99), (20, 0.8, 0.4, 0.6), (30, 0.8, 0.3, 0.7),
                   (40, 0.8, 0.3, 0.1))
    assert best_point(curve)["step"] == 30  # 0.8 thrice: the lower loss, then the earlier step
    assert best_point(curve, after_step=30)["step"] == 40
    assert best_point(curve, after_step=40) is None


def test_a_retrained_configuration_is_chosen_among_its_retraining_steps():
    curve = _curve((10, 0.9, 0.1, 0.9), (80, 0.5, 0.5, 0.5), (90, 0.6, 0.4, 0.6))
    assert selected({"config": "bidora_paper", "curve": curve}, 80)["step"] == 90
    assert selected({"config": "bidora", "curve": curve}, 80)["step"] == 10
    assert selected({"config": "lora", "failed": True}, 80) is None


def _run(config, lr, seed, val, test=0.5, task="decoder", noise=0.25, stage="tuning"):
    return {"task": task, "noise": noise, "config": config, "learning_rate": lr, "seed": seed, "stage": stage,
            "curve": _curve((10, val, 0.1, test), (20, val - 0.1, 0.2, 1.0))}


def test_learning_rate_is_the_best_mean_validation_accuracy_ties_to_the_smaller():
    runs = [_run("lora", 1e-3, 1000, 0.8, test=0.1), _run("lora", 1e-3, 1001, 0.6, test=0.1),  # mean 0.7
            _run("lora", 3e-4, 1000, 0.7, test=1.0), _run("lora", 3e-4, 1001, 0.7, test=1.0),  # 0.7: smaller wins
            _run("lora", 1e-4, 1000, 0.9), {**_run("lora", 1e-4, 1001, 0.9), "failed": True},  # a failure: -inf
            _run("dora", 1e-2, 1000, 0.3), _run("dora", 1e-3, 1000, 0.2)]
    assert choose_learning_rates(runs, 80) == {("decoder", "lora"): 3e-4, ("decoder", "dora"): 1e-2}


def test_tuning_and_evaluation_seeds_are_apart_and_grids_per_configuration():
    study = StudyConfig(tasks=["decoder"], configs=["lora", "bidora_paper"], seeds=3, tuning_seeds=2)
    tuning = tuning_cells(study)
    assert {c.seed for c in tuning} == {1000, 1001} and {c.noise for c in tuning} == {0.25}
    assert sorted({c.learning_rate for c in tuning if c.config == "bidora_paper"}) == GRIDS["bidora_paper"]
    chosen = {("decoder", "lora"): 3e-4, ("decoder", "bidora_paper"): 1e-2}
    evaluation = evaluation_cells(study, chosen)
    assert len(evaluation) == 3 * 3 * 2 and {c.seed for c in evaluation} == {0, 1, 2}
    assert all(c.learning_rate == chosen[c.task, c.config] for c in evaluation)
    assert [c.seed for c in evaluation] == sorted(c.seed for c in evaluation)  # seed by seed


# ---- paired comparisons -------------------------------------------------------------------------

def test_t_quantiles_give_a_95_percent_interval():
    """Each table value q: the t density (lgamma form) integrated over [-q, q] is 0.95 (Simpson)."""
    for df, q in T975.items():
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        n = 4000
        xs = [q * i / n for i in range(n + 1)]
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df)) for x in xs]
        area = q / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
        assert 2 * area == pytest.approx(0.95, abs=2e-4), df


def test_mean_ci_and_paired_differences_by_closed_form():
    values = [0.1, 0.3, 0.2, 0.4]
    mean, half = mean_ci(values)
    assert mean == pytest.approx(0.25)
    assert half == pytest.approx(3.182 * statistics.stdev(values) / 2)
    study = {"tasks": ["decoder"], "noises": [0.25], "seeds": 3, "configs": ["lora", "bilora"], "max_steps": 80}
    runs = [_run("lora", 1e-3, 0, 0.8, test=0.70, stage="evaluation"),
            _run("lora", 1e-3, 1, 0.8, test=0.80, stage="evaluation"),
            _run("lora", 1e-3, 2, 0.8, test=0.90, stage="evaluation"),
            _run("bilora", 1e-3, 0, 0.8, test=0.75, stage="evaluation"),
            _run("bilora", 1e-3, 1, 0.8, test=0.80, stage="evaluation"),
            {**_run("bilora", 1e-3, 2, 0.8, stage="evaluation"), "failed": True}]
    table = evaluation_table({"study": study, "runs": runs})
    assert table["decoder", 0.25]["seeds"] == [0, 1]  # seed 2: one configuration failed, not paired
    claim = next(c for c in paired(table) if c["a"] == "bilora")
    assert claim["by_seed"] == pytest.approx([0.05, 0.0])
    assert (claim["wins"], claim["ties"], claim["seeds"]) == (1, 1, 2)
    assert claim["ci95"] == pytest.approx(12.706 * statistics.stdev([0.05, 0.0]) / math.sqrt(2))
    assert table["decoder", 0.25]["lora"]["final_test"] == [1.0, 1.0]  # the last point: no early stopping


# ---- the runs' settings reach launch/train.py ---------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("micro")
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(folder)
    return folder


def test_parameter_counts_by_hand(model_dir):
    # per layer (out, in): q 32x32, k 16x32, v 16x32, o 32x32, gate 48x32, up 48x32, down 32x48
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
    lora_per_rank = 2 * sum(o + i for o, i in shapes)
    outs = 2 * sum(o for o, _ in shapes)
    assert parameter_counts(model_dir, "lora", 4, "all-linear")["inference"] == 4 * lora_per_rank
    dora = parameter_counts(model_dir, "dora", 4, "all-linear")
    assert dora["inference"] == dora["trained"] == 4 * lora_per_rank + outs
    bidora = parameter_counts(model_dir, "bidora", 4, "all-linear")
    assert (bidora["inner"], bidora["outer"]) == (4 * lora_per_rank, outs)
    assert parameter_counts(model_dir, "bilora", 4, "all-linear")["outer"] == 4 * 14  # lambda: r per layer
    sam = parameter_counts(model_dir, "bilora_sam", 4, "all-linear")
    assert sam["inference"] == 4 * lora_per_rank and sam["trained"] == 8 * lora_per_rank
    qv = parameter_counts(model_dir, "bidora", 4, "q_proj,v_proj")  # a preset's targets
    assert qv["inference"] == 2 * 4 * ((32 + 32) + (16 + 32)) + 2 * (32 + 16)


def test_matched_ranks_pick_the_closest_budget_and_presets_keep_theirs(model_dir):
    study = StudyConfig(base_rank=4)
    chosen = matched_ranks(model_dir, study)
    budget = chosen["lora"]["budget"]
    assert chosen["lora"]["rank"] == 4 and chosen["lora"]["inference"] == budget
    for config in ("dora", "bilora", "bidora", "bilora_sam"):
        for rank in range(2, 7):
            other = parameter_counts(model_dir, config, rank, "all-linear")["inference"]
            assert abs(chosen[config]["inference"] - budget) <= abs(other - budget)
    assert (chosen["bidora_paper"]["rank"], chosen["bidora_paper"]["targets"]) == (4, "q_proj,v_proj")
    assert (chosen["bilora_paper"]["rank"], chosen["bilora_paper"]["targets"]) == (8, "q_proj,v_proj")


def test_task_files_hold_train_plus_validation_noisy_and_a_clean_test(tmp_path):
    study, world = StudyConfig(n_train=40, n_val=10, n_test=30), WorldConfig()
    data, test = write_task_files(tmp_path, study, world, 0.25, 3)
    rows, test_rows = ([json.loads(line) for line in path.read_text().splitlines()] for path in (data, test))
    train, clean = make_task(LEX, 50, 30, 0.25, 3, study.negation)
    assert len(rows) == 50 and [r["label"] for r in rows] == [e["label"] for e in train]  # noisy, 13 flipped
    assert sum(e["noisy"] for e in train) == round(0.25 * 50)
    assert [r["label"] for r in test_rows] == [e["label"] for e in clean]


@pytest.mark.parametrize("config", ["lora", "bidora_paper", "bilora_paper"])
@pytest.mark.parametrize("task", ["decoder", "encoder"])
def test_a_runs_flags_reach_the_run_config(tmp_path, config, task):
    """train_argv's flags, read by launch/train.py's own parser: the grid's rate, the preset's other
    rates in proportion, BiDoRA's retraining steps, RoBERTa's names for the preset's targets."""
    from ds_bilevel.config import load_config

    study = StudyConfig()
    budget = {"rank": 7, "targets": "query,value" if task == "encoder" else "q_proj,v_proj"}
    cell = Cell(task, 0.25, config, 1e-2, 0)
    argv = train_argv(study, cell, tmp_path / "model", tmp_path / "task.jsonl", ("a", "b"), budget,
                      tmp_path / "out", Path("ds_configs/cpu_zero2.json"))
    run = load_config(argv)
    assert run.learning_rate == 1e-2 and run.max_steps == study.max_steps and run.data.eval_size == study.n_val
    assert run.adapter.method == {"lora": "lora", "bidora_paper": "bidora", "bilora_paper": "bilora"}[config]
    if config == "lora":
        assert (run.adapter.rank, run.adapter.alpha, run.adapter.target_modules) == (7, 16.0, ["all-linear"])
    elif config == "bidora_paper":  # preset lr 5e-5, outer 5e-5, retrain 3e-5: scaled by 1e-2 / 5e-5
        assert run.bilevel.outer_learning_rate == pytest.approx(1e-2)
        assert run.bilevel.retrain_learning_rate == pytest.approx(6e-3)
        assert run.bilevel.retrain_steps == round(1.5 * study.max_steps)
        assert (run.adapter.rank, run.adapter.alpha, run.adam_beta2) == (4, 4.0, 0.98)
    else:
        assert run.bilevel.outer_learning_rate == 0.0  # the preset sets none: the inner rate
        assert run.bilevel.retrain_steps == 0
    if config != "lora":
        targets = run.adapter.target_modules
        assert list(targets) == (["query", "value"] if task == "encoder" else ["q_proj", "v_proj"])


# ---- the worker: one short run ------------------------------------------------------------------

def test_worker_curve_holds_the_recipes_validation_and_the_test_set(tmp_path):
    """One 4-step LoRA run through bench/generalisation_worker.py: an evaluation at steps 0, 2, 4 of
    the validation split (the recipe's own evaluation) and of the test file."""
    import os
    import subprocess
    import sys

    from bench.generalisation import ROOT

    train, test = make_task(LEX, 40, 16, 0.25, 1)
    (tmp_path / "task.jsonl").write_text("".join(json.dumps({"text": e["text"], "label": e["label"]}) + "\n"
                                                 for e in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(e) + "\n" for e in test))
    out = tmp_path / "run"
    argv = ["--ds_config", "ds_configs/cpu_zero2.json", "--model_name_or_path", "builtin:tiny-llama",
            "--dataset", str(tmp_path / "task.jsonl"), "--data.format", "classification",
            "--data.label_names", ",".join(LEX.labels), "--data.eval_size", "8", "--method", "lora",
            "--max_steps", "4", "--micro_batch_size", "4", "--eval_steps", "2", "--log_steps", "2",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--overwrite_output_dir", "true"]
    plan = {"deadline": None, "jobs": [{"argv": argv, "test_file": str(tmp_path / "test.jsonl"),
                                        "result": str(tmp_path / "result.json")}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    worker = [sys.executable, str(ROOT / "bench" / "generalisation_worker.py"), str(tmp_path / "plan.json")]
    proc = subprocess.run(worker, cwd=ROOT, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert not result.get("failed"), result
    assert [p["step"] for p in result["curve"]] == [0, 2, 4]
    assert not out.exists()  # nothing of a study run is kept but its result
    assert all(0 <= p["test_acc"] <= 1 and p["test_loss"] > 0 for p in result["curve"])
    assert result["curve"][0]["val_acc"] == result["curve"][0]["test_acc"] == 0.0  # untrained: never the label
