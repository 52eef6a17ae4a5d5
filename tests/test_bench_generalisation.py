"""The generalisation study's own pieces (bench/generalisation*.py): no launcher, no training."""

from __future__ import annotations

import random

import pytest

from bench.generalisation import (
    StudyConfig,
    bilevel_split_sizes,
    matched_ranks,
    parameter_counts,
    pick_learning_rate,
    write_task_file,
)
from bench.generalisation_report import paired, single_class
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


def _runs(pairs):
    return {"runs": [{"method": m, "seed": s, "test_acc": acc, "test_predicted_positive": pos}
                     for m, s, acc, pos in pairs]}


def test_single_class_runs_are_flagged():
    results = _runs([("lora", 0, 0.52, 1.0), ("lora", 1, 0.8, 0.5), ("dora", 0, 0.5, 0.01), ("dora", 1, 0.7, 0.97)])
    assert [(f["method"], f["seed"]) for f in single_class(results)] == [("lora", 0), ("dora", 0)]


def test_paired_differences_by_seed():
    results = _runs([("lora", 0, 0.8, 0.5), ("lora", 1, 0.7, 0.5), ("bilora", 0, 0.9, 0.5), ("bilora", 1, 0.7, 0.5),
                     ("bilora_sam", 0, 0.6, 0.5)])
    claims = paired(results)
    assert claims["bilora-lora"]["by_seed"] == pytest.approx({0: 0.1, 1: 0.0})
    assert (claims["bilora-lora"]["wins"], claims["bilora-lora"]["ties"]) == (1, 1)
    assert claims["bilora_sam-lora"]["seeds"] == 1 and "bidora-dora" not in claims


def test_learning_rate_pick_is_the_best_test_accuracy_ties_to_the_smaller():
    sweep = [{"learning_rate": 1e-2, "test_acc": 0.8}, {"learning_rate": 1e-3, "test_acc": 0.8},
             {"learning_rate": 3e-3, "test_acc": 0.7}, {"learning_rate": 1e-4, "failed": True}]
    assert pick_learning_rate(sweep, 5.0) == 1e-3
    assert pick_learning_rate([{"learning_rate": 1e-4, "failed": True}], 5.0) == 5.0


@pytest.mark.parametrize("n, ratio, seed", [(128, 0.8, 0), (128, 0.8, 3), (100, 0.7, 1)])
def test_bilevel_split_covers_exactly_the_baseline_training_set(n, ratio, seed):
    d1, d2 = bilevel_split_sizes(n, ratio, seed)
    assert d1 + d2 == n and d1 == round(ratio * n)


def test_recipe_holds_out_exactly_the_clean_test_set(tmp_path):
    from ds_bilevel.data import DataConfig

    config = DataConfig(format="classification", label_names=list(LEX.labels), eval_size=40)
    train, test = make_task(LEX, 24, 40, 0.25, 5)
    write_task_file(tmp_path / "task.jsonl", train, test, 5, config)  # raises if the split differs


def test_a_misplaced_test_set_is_caught(tmp_path, monkeypatch):
    import bench.generalisation as study
    from ds_bilevel.data import DataConfig

    config = DataConfig(format="classification", label_names=list(LEX.labels), eval_size=40)
    train, test = make_task(LEX, 24, 40, 0.25, 5)
    real = study.heldout_positions
    monkeypatch.setattr(study, "heldout_positions", lambda n_train, n_test, seed: real(n_train, n_test, seed + 1))
    with pytest.raises(RuntimeError, match="not the intended"):
        write_task_file(tmp_path / "other.jsonl", train, test, 5, config)


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
    targets = StudyConfig().target_modules
    assert parameter_counts(model_dir, "lora", 4, targets)["inference"] == 4 * lora_per_rank
    dora = parameter_counts(model_dir, "dora", 4, targets)
    assert dora["inference"] == dora["trained"] == 4 * lora_per_rank + outs
    bidora = parameter_counts(model_dir, "bidora", 4, targets)
    assert (bidora["inner"], bidora["outer"]) == (4 * lora_per_rank, outs)
    assert parameter_counts(model_dir, "bilora", 4, targets)["outer"] == 4 * 14  # lambda: r per layer
    sam = parameter_counts(model_dir, "bilora_sam", 4, targets)
    assert sam["inference"] == 4 * lora_per_rank and sam["trained"] == 8 * lora_per_rank


def test_matched_ranks_pick_the_closest_budget(model_dir):
    chosen = matched_ranks(model_dir, StudyConfig(base_rank=4))
    budget = chosen["lora"]["budget"]
    assert chosen["lora"]["rank"] == 4 and chosen["lora"]["inference"] == budget
    for method, row in chosen.items():
        for rank in range(2, 7):
            other = parameter_counts(model_dir, method, rank, StudyConfig().target_modules)["inference"]
            assert abs(row["inference"] - budget) <= abs(other - budget)
