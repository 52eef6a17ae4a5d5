"""Classification with an encoder and its head: data, the loss normalisation, the head's level, export."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from numerics import rel_err
from peft import PeftModel
from run_folders import write_run
from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForMaskedLM

from ds_bilevel.adapters import AdapterConfig
from ds_bilevel.config import RunConfig
from ds_bilevel.data import DataConfig, class_labels, collate, load_records
from ds_bilevel.engine import BilevelEngine
from ds_bilevel.export import export
from ds_bilevel.heads import is_encoder
from ds_bilevel.hypergrad import Objective
from ds_bilevel.levels import Level, adapter_layers, named_level_parameters
from ds_bilevel.models import is_encoder_model, load_tokenizer
from ds_bilevel.preparation import prepare
from ds_bilevel.reference import ReferenceBilevel
from ds_bilevel.schedule import BatchSource

LETTERS = "abcdefgh"


def write_keyword_csv(path: Path, size: int, seed: int = 0) -> Path:
    """An easy separable task: four random letters and a keyword; the label says which keyword."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(size):
            words = [rng.choice(LETTERS) for _ in range(4)]
            keyword = rng.choice(["even", "odd"])
            words.insert(rng.randrange(5), keyword)
            writer.writerow([" ".join(words), "yes" if keyword == "even" else "no"])
    return path


def encoder_run(tmp_path: Path, method: str = "lora", model: str = "builtin:tiny-roberta",
                targets: tuple[str, ...] = ("query", "value"), **overrides) -> RunConfig:
    data = write_keyword_csv(tmp_path / "keyword.csv", 96)
    return RunConfig(model_name_or_path=model, dataset=str(data), output_dir=str(tmp_path / "run"), seed=0,
                     gradient_checkpointing=False, max_grad_norm=0.0, warmup_ratio=0.0,
                     adapter=AdapterConfig(method=method, rank=4, alpha=8.0, target_modules=list(targets)),
                     data=DataConfig(format="classification", eval_size=16), **overrides)


@torch.no_grad()
def perturb_levels(model: torch.nn.Module, seed: int = 1) -> None:
    """Every adapter and head value non-trivial (LoRA's B is zero at init): dW != 0 everywhere.
    Unlike numerics.randomize (adapter layers only), it moves every level's parameters, the
    classification head's included, by noise added to their values."""
    gen = torch.Generator().manual_seed(seed)
    for level in Level:
        for name, param in named_level_parameters(model, level):
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(param * (1 + 0.1 * noise) if name.endswith("magnitude") else param + 0.1 * noise)


def test_encoder_rule():
    assert is_encoder_model("builtin:tiny-roberta") and not is_encoder_model("builtin:tiny-llama")
    assert is_encoder({"model_type": "bert"}) and is_encoder({"model_type": "deberta-v2"})
    assert is_encoder({"model_type": "t5", "is_encoder_decoder": True})
    assert not is_encoder({"model_type": "llama"}) and not is_encoder({"model_type": "qwen2"})


@pytest.mark.parametrize(("model", "targets", "encoder"), [("builtin:tiny-roberta", ("query", "value"), True),
                                                         ("builtin:tiny-llama", ("q_proj", "v_proj"), False)])
def test_validation_decides_the_encoder_rule_once(tmp_path, monkeypatch, model, targets, encoder):
    """check_run applies heads.is_encoder once (check_model's answer reaches the tokenizer check)."""
    from ds_bilevel import models, validation

    answers = []
    real = models.is_encoder_model
    monkeypatch.setattr(models, "is_encoder_model", lambda *args: answers.append(real(*args)) or answers[-1])
    validation.check_run(encoder_run(tmp_path, model=model, targets=targets), world_size=1)
    assert answers == [encoder]


def test_class_labels_and_batches(tmp_path):
    train, evaluation = load_records(str(write_keyword_csv(tmp_path / "k.csv", 40)),
                                     DataConfig(format="classification", eval_size=8), seed=0)
    config = DataConfig(format="classification")
    assert class_labels(config, train, evaluation) == ["no", "yes"]  # strings: sorted
    assert class_labels(DataConfig(label_names=["yes", "no"]), train) == ["yes", "no"]  # or as named
    ints = {"label": [2, 0, 0]}
    assert class_labels(config, ints) == ["0", "1", "2"]  # integers: the ids 0 .. max
    assert class_labels(DataConfig(label_names=["a", "b", "c"]), ints) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="data.label_names: labels \\['maybe'\\] are not among"):
        class_labels(DataConfig(label_names=["yes", "no"]), {"label": ["yes", "maybe"]})
    data = prepare(encoder_run(tmp_path))
    assert data.labels == ["no", "yes"] and data.model.config.id2label == {0: "no", 1: "yes"}
    example = data.train_set[0]
    assert isinstance(example["labels"], int) and example["input_ids"][0] == 1 and example["input_ids"][-1] == 2
    batch = collate([data.train_set[i] for i in range(4)], pad_id=3)
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[0] == 4
    source = BatchSource(data.train_set, list(range(len(data.train_set))), 8, 4, 0, 1, 0, 3)
    assert source.batch(0).labelled_tokens == 8  # a classifier's count: examples


def test_head_is_inner_and_never_adapted(tmp_path):
    data = prepare(encoder_run(tmp_path, "bidora"))
    inner = dict(named_level_parameters(data.model, Level.INNER))
    head = {n for n in inner if n.startswith("classifier.")}
    assert head == {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                    "classifier.out_proj.bias"}
    assert all(not n.startswith("classifier") for n, _ in adapter_layers(data.model))
    outer = {n for n, _ in named_level_parameters(data.model, Level.OUTER)}
    assert outer and all(n.endswith("magnitude") for n in outer)
    trainable = {n for n, p in data.model.named_parameters() if p.requires_grad}
    assert trainable == set(inner) | outer  # the base stays frozen


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def test_loss_normalisation_is_world_size_invariant(tmp_path):
    """The gradient DeepSpeed reduces from engine.forward_loss (each rank's micro-batches, scaled,
    divided by the accumulation steps, averaged over ranks) is the mean cross-entropy gradient of
    the whole global batch in plain PyTorch, for 1, 2 and 4 ranks and 1, 2 or 4 micro-steps; the
    reference's gradient too."""
    run = encoder_run(tmp_path, "lora")
    data = prepare(run)
    model = data.model.eval()  # no dropout: every pass computes the same function
    perturb_levels(model)
    params = [p for level in Level for _, p in named_level_parameters(model, level)]
    everything, global_batch = list(range(len(data.train_set))), 8

    def source(rank: int, world: int, micro: int) -> BatchSource:
        return BatchSource(data.train_set, everything, global_batch, micro, rank, world, 0, 3)

    step = 3
    batch = collate([data.train_set[i] for i in source(0, 1, 8).order.global_indices(step)], 3)
    model.zero_grad()
    F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                    batch["labels"]).backward()
    expected = flat_grads(params)
    assert expected.norm() > 0
    errors = {}
    for world, accumulation in ((1, 1), (1, 4), (2, 1), (2, 2), (4, 2)):
        model.zero_grad()
        for rank in range(world):
            shard = source(rank, world, global_batch // (world * accumulation)).batch(step)
            fake = SimpleNamespace(ds_engine=model, world_size=world, accumulation=accumulation, loss_head=None)
            for micro in shard.micro_batches:
                loss, _ = BilevelEngine.forward_loss(fake, micro, shard.labelled_tokens)
                (loss / (accumulation * world)).backward()  # DeepSpeed: / accumulation, mean over ranks
        errors[(world, accumulation)] = ((flat_grads(params) - expected).norm() / expected.norm()).item()
    reference = ReferenceBilevel(model, run)
    reference.batches[Objective.INNER] = source(0, 1, 8).batch(step)
    inner, _ = reference.gradients(Objective.INNER)
    errors["reference"] = ((torch.cat([g.flatten() for g in inner]) - expected).norm() / expected.norm()).item()
    assert max(errors.values()) < 1e-5, errors


@pytest.fixture(scope="module")
def masked_lm_dir(tmp_path_factory) -> Path:
    """An HF masked-LM encoder folder (no classification head), as RoBERTa checkpoints are."""
    folder = tmp_path_factory.mktemp("roberta-mlm")
    tokenizer = load_tokenizer("builtin:tiny-roberta")
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=132, type_vocab_size=1, pad_token_id=3,
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("base", ["builtin", "hf-folder"])
@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, masked_lm_dir, base, method):
    model_name = "builtin:tiny-roberta" if base == "builtin" else str(masked_lm_dir)
    run = encoder_run(tmp_path, method, model=model_name)
    data = prepare(run)
    perturb_levels(data.model)
    folder = write_run(Path(run.output_dir), data.model, run, data.labels)
    batch = collate([data.eval_set[i] for i in range(len(data.eval_set))], 3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = data.model.eval()(**inputs).logits
    merged = AutoModelForSequenceClassification.from_pretrained(
        export(folder, tmp_path / "merged", format="merged", dtype="float32"), dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "no", 1: "yes"}
    peft_dir = export(folder, tmp_path / "peft", format="peft")
    peft_base = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((peft_dir / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        peft_base, dtype=torch.float32, num_labels=2), peft_dir).eval()
    with torch.no_grad():
        errors = {"merged": rel_err(merged(**inputs).logits, expected),
                  "peft": rel_err(peft(**inputs).logits, expected)}
    assert max(errors.values()) < 1e-5, errors


WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, "even", "odd", "yes", "no"]


def bert_tokenizer():
    """A WordPiece tokenizer as BERT's: [CLS] text [SEP], a pad token, and no EOS."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: i for i, word in enumerate(WORDPIECE)})


@pytest.fixture(scope="module")
def pooler_dirs(tmp_path_factory) -> dict[str, Path]:
    """Encoders whose classifier reads a pooler outside the classifier module, with BERT's tokenizer:
    BERT saved as pretrained (BertForPreTraining: the pooler is in the checkpoint) and DeBERTa-v2 as a
    masked LM (no pooler in the checkpoint: it starts from the seeded init, as the classifier)."""
    from families import config_of
    from transformers import BertForPreTraining, DebertaV2ForMaskedLM

    folders = {}
    for family, cls in (("bert", BertForPreTraining), ("deberta_v2", DebertaV2ForMaskedLM)):
        folder = folders[family] = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        cls(config_of(family, pad_token_id=0)).save_pretrained(folder)
        bert_tokenizer().save_pretrained(folder)
    return folders


@pytest.mark.parametrize("family", ["bert", "deberta_v2"])
@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_an_encoder_with_a_pooler_trains_saves_and_exports_it(tmp_path, pooler_dirs, family, method):
    """The pooler is trained and saved with the classifier (heads.py); both exports reproduce the
    adapted model, and two loads of the merged folder compute the same logits (a pooler left out of
    the export would be drawn afresh at every load). all-linear adapts the encoder's dense layers."""
    run = encoder_run(tmp_path, method, model=str(pooler_dirs[family]), targets=("all-linear",))
    data = prepare(run)
    pooler = "bert.pooler" if family == "bert" else "pooler"
    inner = {n for n, _ in named_level_parameters(data.model, Level.INNER)}
    assert {f"{pooler}.dense.weight", f"{pooler}.dense.bias", "classifier.weight"} <= inner
    assert data.adapted and not any(n.startswith((pooler, "classifier")) for n in data.adapted)
    assert any(n.endswith("output.dense") for n in data.adapted)  # the encoder's dense layers are adapted
    perturb_levels(data.model)
    folder = write_run(Path(run.output_dir), data.model, run, data.labels)
    batch = collate([data.eval_set[i] for i in range(len(data.eval_set))], data.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = data.model.eval()(**inputs).logits
    merged_dir = export(folder, tmp_path / "merged", format="merged", dtype="float32")
    loads = [AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
             for _ in range(2)]
    peft_dir = export(folder, tmp_path / "peft", format="peft")
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert sorted(peft_config["modules_to_save"]) == sorted([pooler, "classifier"])
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        peft_config["base_model_name_or_path"], dtype=torch.float32, num_labels=2), peft_dir).eval()
    with torch.no_grad():
        first, second = (model(**inputs).logits for model in loads)
        errors = {"merged": rel_err(first, expected), "peft": rel_err(peft(**inputs).logits, expected)}
    print(f"{family} {method} {errors}")
    assert torch.equal(first, second)
    assert max(errors.values()) < 1e-5, errors


def trained_model(run_dir: Path):
    """prepare() of the run, its model holding the run's saved adapters and head."""
    from safetensors.torch import load_file

    from ds_bilevel.config import config_from_flat

    values = json.loads((run_dir / "run_config.json").read_text())
    flat = {f"{section}.{k}": v for section in ("adapter", "data", "bilevel") for k, v in values.pop(section).items()}
    run = config_from_flat({**values, **flat})
    data = prepare(run)
    saved = load_file(run_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for level in Level:
            for name, param in named_level_parameters(data.model, level):
                param.copy_(saved.pop(name))
    assert not saved
    return data


@pytest.mark.launcher
def test_two_rank_encoder_training_learns_and_exports(tmp_path):
    """The real launcher on 2 CPU ranks, builtin encoder, a CSV with string labels: LoRA at ZeRO-2
    (bf16) and BiDoRA at ZeRO-3 (fp32) lift accuracy from the untrained head's to ~1; the BiDoRA
    run's merged export, loaded by transformers, computes the trained model's logits."""
    from launch_helpers import launch, run_summary, write_ds_config

    data = write_keyword_csv(tmp_path / "keyword.csv", 320)
    shared = ["--model_name_or_path", "builtin:tiny-roberta", "--dataset", str(data), "--data.format",
              "classification", "--data.eval_size", "64", "--adapter.target_modules", "query,value",
              "--adapter.rank", "4", "--max_steps", "100", "--micro_batch_size", "8", "--gradient_accumulation_steps",
              "1", "--learning_rate", "5e-3", "--warmup_ratio", "0", "--eval_steps", "50", "--checksum_base", "true"]
    zero3 = write_ds_config(tmp_path, 3, bf16=False)
    summaries = {}
    for method, ds_config in (("lora", "ds_configs/cpu_zero2.json"), ("bidora", str(zero3))):
        out = tmp_path / method
        result = launch(["--ds_config", ds_config, "--method", method, "--output_dir", str(out), *shared])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "accuracy       0." in result.stdout
        summaries[method] = summary = run_summary(out)
        assert json.loads((out / "labels.json").read_text()) == ["no", "yes"]
        assert summary["accuracy_before"] < 0.75, summary  # the untrained head: about the majority class
        assert summary["accuracy_after"] >= 0.95, summary
        assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"], summary
        assert summary["relative_change"]["inner"] > 0
    assert summaries["bidora"]["relative_change"]["outer"] > 0  # the magnitudes moved at the outer level
    trained = trained_model(tmp_path / "bidora")
    batch = collate([trained.eval_set[i] for i in range(len(trained.eval_set))], 3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    merged = AutoModelForSequenceClassification.from_pretrained(
        export(tmp_path / "bidora", tmp_path / "merged", format="merged", dtype="float32"), dtype=torch.float32)
    with torch.no_grad():
        expected = trained.model.eval()(**inputs).logits
        error = rel_err(merged.eval()(**inputs).logits, expected)
        accuracy = (merged(**inputs).logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert error < 1e-5, error
    assert accuracy == pytest.approx(summaries["bidora"]["accuracy_after"])
