"""Encoder bases beyond a masked LM, trained by a real 1-rank run and exported: a classifier saved
for another label count than the run's (an MNLI checkpoint on a 2-label task), and encoder-decoders
(BART; T5, its wo adapted too). Both were refused before: the first at merged export, the
second before launch (the meta skeleton's shared embeddings untied; T5's wo, whose weight its
feed-forward reads, which an adapter layer lacked) or in the head's init (BART/T5 configs have no
initializer_range)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from launch_helpers import REPO, cpu_env
from numerics import rel_err
from peft import PeftModel
from run_folders import write_run
from test_classification import encoder_run, perturb_levels, trained_model, write_keyword_csv
from transformers import AutoModelForSequenceClassification

from ds_bilevel.data import collate
from ds_bilevel.export import export
from ds_bilevel.export.run_folder import ExportError
from ds_bilevel.model_checks import check_model_weights
from ds_bilevel.models import encoder_skeleton, head_init_std, load_tokenizer
from ds_bilevel.preparation import prepare
from ds_bilevel.validation import check_run


def roberta_classifier(folder: Path, hidden: int = 32, num_labels: int = 3) -> Path:
    """A RoBERTa saved as a sequence classifier with ``num_labels`` labels (an MNLI checkpoint: 3)."""
    tokenizer = load_tokenizer("builtin:tiny-roberta")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=132, type_vocab_size=1, pad_token_id=3, bos_token_id=1, eos_token_id=2,
        num_labels=num_labels)
    transformers.RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder_decoder_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BART and T5 folders as published (ForConditionalGeneration: no classification head,
    the embeddings stored once as `shared`), with the builtin sentencepiece tokenizer."""
    tokenizer = load_tokenizer("builtin:micro-llama")
    ids = {"vocab_size": len(tokenizer), "pad_token_id": 3, "eos_token_id": 2}
    configs = {
        "bart": transformers.BartConfig(**ids, d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64,
                                        max_position_embeddings=64, bos_token_id=1, decoder_start_token_id=2),
        "t5": transformers.T5Config(**ids, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                    decoder_start_token_id=3)}
    folders = {}
    for family, config in configs.items():
        folder = folders[family] = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        model_cls = transformers.BartForConditionalGeneration if family == "bart" else \
            transformers.T5ForConditionalGeneration
        model_cls(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def train_one_rank(tmp_path: Path, model: Path, *flags: str) -> Path:
    """launch/train.py on one CPU rank (no launcher), 4 LoRA steps on the keyword task's 2 labels."""
    data = write_keyword_csv(tmp_path / "keyword.csv", 96)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--model_name_or_path", str(model), "--dataset", str(data),
         "--data.format", "classification", "--data.eval_size", "16", "--max_steps", "4", "--micro_batch_size", "8",
         "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--ds_config", "ds_configs/cpu_zero2.json",
         "--output_dir", str(out), *flags], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def eval_inputs(data) -> dict[str, torch.Tensor]:
    batch = collate([data.eval_set[i] for i in range(len(data.eval_set))], data.tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def exported_logits(run_dir: Path, tmp_path: Path, inputs: dict, **base_kwargs) -> dict[str, torch.Tensor]:
    """Both exports of ``run_dir`` as their users load them: the merged folder by transformers
    (checked to load whole: nothing missing or mismatched; unexpected only the base's LM head, which
    the merged folder keeps, docs/export.md), the PEFT adapter by peft
    on its base loaded as a 2-label classifier (``base_kwargs`` added)."""
    merged_dir = export(run_dir, tmp_path / "merged", format="merged", dtype="float32")
    merged, info = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(key.startswith(("lm_head.", "final_logits_bias")) for key in info["unexpected_keys"]), info
    assert merged.config.num_labels == 2 and merged.config.id2label == {0: "no", 1: "yes"}
    peft_dir = export(run_dir, tmp_path / "peft", format="peft")
    base = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        base, dtype=torch.float32, num_labels=2, **base_kwargs), peft_dir)
    with torch.no_grad():
        return {"merged": merged.eval()(**inputs).logits, "peft": peft.eval()(**inputs).logits}


def test_a_classifier_base_with_another_label_count_exports_the_runs_head(tmp_path):
    """A 3-label classifier base, a real run on 2 labels: training re-initialises the head's label
    rows (load_classifier: ignore_mismatched_sizes) and trains them; the merged export writes that
    2-label head with the run's id2label (before: refused, "head tensor classifier.out_proj.bias of
    shape (2,), but the base's is (3,)"), and both exports give the trained model's logits. The
    PEFT adapter loads onto that base only with ignore_mismatched_sizes, as docs/export.md says.
    A base of another hidden size is still refused."""
    base = roberta_classifier(tmp_path / "roberta-mnli")
    run_dir = train_one_rank(tmp_path, base, "--adapter.target_modules", "query,value")
    trained = trained_model(run_dir)
    assert trained.model.classifier.out_proj.weight.shape == (2, 32)
    inputs = eval_inputs(trained)
    with torch.no_grad():
        expected = trained.model.eval()(**inputs).logits
    logits = exported_logits(run_dir, tmp_path, inputs, ignore_mismatched_sizes=True)
    errors = {name: rel_err(value, expected) for name, value in logits.items()}
    print(f"3-label base {errors}")
    assert max(errors.values()) < 1e-5, errors
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' refusal of the 3-label head
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    other = roberta_classifier(tmp_path / "roberta-48", hidden=48)
    with pytest.raises(ExportError, match=r"holds head tensor classifier\.dense\.bias of shape \(32,\), but the "
                                          r"base's is \(48,\) \(another base model\?\)"):
        export(run_dir, tmp_path / "other", format="merged", dtype="float32", base_model=str(other))


def test_bart_trains_in_a_real_run_and_both_exports_give_its_logits(tmp_path, encoder_decoder_dirs):
    """BART as published (ForConditionalGeneration) passes the launch checks (its encoder's and
    decoder's embed_tokens are the file's single `shared` table), gets a classification_head drawn
    at its init_std, trains at the default all-linear targets, and both exports give the trained
    model's logits (merged: the lm_head and final_logits_bias it keeps are skipped at load)."""
    run_dir = train_one_rank(tmp_path, encoder_decoder_dirs["bart"])
    trained = trained_model(run_dir)
    assert type(trained.model).__name__ == "BartForSequenceClassification"
    assert any(name.endswith("decoder.layers.0.fc2") for name in trained.adapted)
    inputs = eval_inputs(trained)
    with torch.no_grad():
        expected = trained.model.eval()(**inputs).logits
    errors = {name: rel_err(value, expected) for name, value in exported_logits(run_dir, tmp_path, inputs).items()}
    print(f"bart lora {errors}")
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("stage", [2, 3])
def test_t5_with_wo_adapted_trains_in_a_real_run_and_both_exports_give_its_logits(tmp_path, encoder_decoder_dirs,
                                                                                  stage):
    """T5 at the default all-linear targets, wo included: its feed-forward reads wo.weight.dtype,
    which the adapter layer now gives (its base's, as PEFT's layers do; before, wo was refused
    before launch, and without the refusal the first forward failed with an AttributeError). A real
    1-rank run (ZeRO-2; ZeRO-3 with every parameter partitioned, where the weight T5 reads outside
    wo's forward may be an empty partition, of the weight's dtype) trains wo's adapters (LoRA's B,
    zero at init, is not after 4 steps), they change the logits, and both exports give the trained
    model's logits."""
    ds_config = REPO / "ds_configs" / "cpu_zero2.json"
    if stage == 3:  # the repository's ZeRO-3 config keeps parameters under 10000 values whole: all of this T5's
        values = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
        values["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        ds_config = tmp_path / "zero3_partitioned.json"
        ds_config.write_text(json.dumps(values))
    run_dir = train_one_rank(tmp_path, encoder_decoder_dirs["t5"], "--ds_config", str(ds_config))
    trained = trained_model(run_dir)
    wo = [name for name in trained.adapted if name.endswith("DenseReluDense.wo")]
    assert [name.split(".")[1] for name in wo] == ["encoder", "decoder"], trained.adapted
    inputs = eval_inputs(trained)
    model = trained.model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        trained_B = {name: model.get_submodule(name).lora_B.clone() for name in wo}
        for name in wo:
            model.get_submodule(name).lora_B.zero_()
        without_wo = model(**inputs).logits
        for name in wo:
            model.get_submodule(name).lora_B.copy_(trained_B[name])
    moved = {name: float(B.abs().max()) for name, B in trained_B.items()}
    assert min(moved.values()) > 1e-3, moved
    assert rel_err(without_wo, expected) > 1e-4  # wo's trained adapters are part of what the exports must give
    errors = {name: rel_err(value, expected) for name, value in exported_logits(run_dir, tmp_path, inputs).items()}
    print(f"t5 wo zero{stage} {errors}, wo's adapters {rel_err(without_wo, expected):.2e} of the logits")
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("method", ["lora", "bidora"])
def test_t5_exports_at_all_linear(tmp_path, encoder_decoder_dirs, method):
    """T5: its folder passes the weights check (shared embeddings tied in the skeleton) and the
    launch checks at all-linear (wo included); with random adapters and head, both exports
    reproduce the adapted model."""
    folder = encoder_decoder_dirs["t5"]
    check_model_weights(folder, encoder_skeleton(str(folder)), base_only=True)
    run = encoder_run(tmp_path, method, model=str(folder), targets=("all-linear",))
    check_run(run, world_size=1)
    data = prepare(run)
    assert sorted({name.rsplit(".", 1)[-1] for name in data.adapted}) == ["k", "o", "q", "v", "wi", "wo"]
    perturb_levels(data.model)
    folder = write_run(Path(run.output_dir), data.model, run, data.labels)
    inputs = eval_inputs(data)
    with torch.no_grad():
        expected = data.model.eval()(**inputs).logits
    errors = {name: rel_err(value, expected) for name, value in exported_logits(folder, tmp_path, inputs).items()}
    print(f"t5 {method} {errors}")
    assert max(errors.values()) < 1e-5, errors


def test_a_fresh_head_is_drawn_at_the_configs_own_std():
    """The std transformers' own init reads, in its order (BART: init_std; T5: initializer_factor
    scaled as its ClassificationHead's, factor * d_model ** -0.5); before, initializer_range alone:
    AttributeError for BART and T5."""
    assert head_init_std(transformers.RobertaConfig(initializer_range=0.03)) == 0.03
    assert head_init_std(transformers.BartConfig(init_std=0.05)) == 0.05
    assert head_init_std(transformers.T5Config(d_model=64, initializer_factor=2.0)) == pytest.approx(0.25)


def test_an_encoder_decoder_whose_tokenizer_pads_with_eos_is_refused_before_launch(tmp_path, encoder_decoder_dirs):
    """A BART/T5 classifier reads the state at each row's EOS and needs one per row: a tokenizer
    padding with EOS made transformers raise "All examples must have the same number of <eos>
    tokens" at the first padded batch, after launch. An encoder without a decoder may pad with it."""
    import shutil

    from ds_bilevel.models import check_tokenizer

    folders = {}
    for name, source in (("bart", encoder_decoder_dirs["bart"]), ("roberta", roberta_classifier(tmp_path / "r"))):
        folder = folders[name] = shutil.copytree(source, tmp_path / f"{name}_pads_with_eos")
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(folder)
    check_tokenizer(str(encoder_decoder_dirs["bart"]), encoder=True)  # its own pad token: allowed
    with pytest.raises(ValueError, match=r"^model_name_or_path: the tokenizer in .* pads with its eos_token"):
        check_tokenizer(str(folders["bart"]), encoder=True)
    check_tokenizer(str(folders["roberta"]), encoder=True)
