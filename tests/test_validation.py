"""Every bad input stops launch/train.py before any process group: one line naming the setting,
exit code 2, the output folder untouched. In-process through train.py's main(), and through
the real deepspeed launcher where the world size or the ranks matter."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
from launch_helpers import REPO, launch

from ds_bilevel.loss_head import SUPPORTED_MODEL_TYPES

MICRO = ["--model_name_or_path", "builtin:micro-llama"]  # hidden 64, k/v projections 64 -> 32


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the default ds_config path is relative to the repository

    def no_training(*_):
        raise AssertionError("validation passed: the run would have started")

    monkeypatch.setattr("ds_bilevel.recipe.TrainingRecipe", no_training)


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def jsonl(path, rows: int, **fields) -> str:
    fields = fields or {"prompt": "q{i}", "response": "a{i}"}
    path.write_text("\n".join(json.dumps({k: v.format(i=i) for k, v in fields.items()}) for i in range(rows)))
    return str(path)


def ds_config(path, **changes) -> str:
    config = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        section = config
        for key in parents:
            section = section.setdefault(key, {})
        section[leaf] = value
    path.write_text(json.dumps(config))
    return str(path)


def hf_folder(path) -> str:
    """A model folder holding only config.json (validation never reads weights)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100).save_pretrained(path)
    return str(path)


def gpt2_folder(path, n_positions: int = 64) -> str:
    """A GPT-2 folder holding only config.json: learned positions, n_positions of them."""
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=n_positions, vocab_size=416, bos_token_id=1,
               eos_token_id=2).save_pretrained(path)
    return str(path)


def classification_csv(path, rows: int = 60) -> str:
    return write(path, "text,label\n" + "".join(f"review number {i},{i % 2}\n" for i in range(rows)))


ROBERTA = ["--model_name_or_path", "builtin:tiny-roberta", "--data.format", "classification"]

# (case id, the setting the line must start with, argv builder given a tmp folder)
CASES = [
    ("max-length-past-roberta-positions", "data.max_length",
     lambda t: [*ROBERTA, "--dataset", classification_csv(t / "c.csv"), "--data.max_length", "256"]),
    ("max-length-past-gpt2-positions", "data.max_length",
     lambda t: ["--model_name_or_path", gpt2_folder(t / "gpt2"), "--data.max_length", "65"]),
    ("method", "adapter.method", lambda t: ["--method", "qlora"]),
    ("hypergrad", "bilevel.hypergrad", lambda t: ["--hypergrad", "newton"]),
    ("split-ratio-one", "bilevel.split_ratio", lambda t: ["--split_ratio", "1.0"]),
    ("unroll-zero", "bilevel.unroll_steps", lambda t: ["--unroll_steps", "0"]),
    ("unroll-past-max-steps", "bilevel.unroll_steps",
     lambda t: ["--method", "bidora", "--max_steps", "3", "--unroll_steps", "5"]),
    ("unknown-flag", "unrecognized arguments: --max_stepz", lambda t: ["--max_stepz", "3"]),
    ("flag-type", "argument --max_steps: invalid int value", lambda t: ["--max_steps", "ten"]),
    ("rank-above-layer", "adapter.rank", lambda t: [*MICRO, "--adapter.rank", "100"]),
    ("aux-rank-above-layer", "adapter.aux_rank",
     lambda t: [*MICRO, "--method", "bilora_sam", "--adapter.aux_rank", "65"]),
    ("target-missing", "adapter.target_modules", lambda t: [*MICRO, "--adapter.target_modules", "q_proj,c_attn"]),
    ("hf-folder-rank", "adapter.rank", lambda t: ["--model_name_or_path", hf_folder(t / "m"), "--adapter.rank", "20"]),
    ("model-path-missing", "model_name_or_path", lambda t: ["--model_name_or_path", str(t / "nope")]),
    ("builtin-unknown", "model_name_or_path", lambda t: ["--model_name_or_path", "builtin:gpt5"]),
    ("dataset-missing", "dataset", lambda t: ["--dataset", str(t / "missing.jsonl")]),
    ("dataset-empty-file", "dataset", lambda t: ["--dataset", write(t / "e.jsonl", "")]),
    ("dataset-malformed", "dataset", lambda t: ["--dataset", write(t / "b.jsonl", '{"prompt": 1\n')]),
    ("csv-header-only", "dataset", lambda t: ["--dataset", write(t / "h.csv", "prompt,response\n")]),
    ("field-missing", "data.prompt_field",
     lambda t: [*MICRO, "--dataset", jsonl(t / "d.jsonl", 40, question="q{i}", response="a{i}")]),
    ("eval-takes-all", "data.eval_size",
     lambda t: [*MICRO, "--dataset", jsonl(t / "d.jsonl", 10), "--data.eval_size", "10"]),
    ("batch-above-training-set", "micro_batch_size",
     lambda t: [*MICRO, "--dataset", jsonl(t / "d.jsonl", 40), "--data.eval_size", "8", "--micro_batch_size", "20"]),
    ("batch-above-d2", "micro_batch_size",
     lambda t: [*MICRO, "--method", "bidora", "--data.train_size", "100", "--micro_batch_size", "16"]),
    ("split-empties-d2", "bilevel.split_ratio",
     lambda t: [*MICRO, "--method", "bilora", "--data.train_size", "10", "--split_ratio", "0.99"]),
    ("batch-above-d2-file", "micro_batch_size",
     lambda t: [*MICRO, "--method", "bidora", "--data.validation_file", jsonl(t / "d2.jsonl", 5)]),
    ("d2-file-one-level", "data.validation_file", lambda t: ["--data.validation_file", jsonl(t / "d2.jsonl", 50)]),
    ("d2-file-missing", "data.validation_file", lambda t: ["--data.validation_file", str(t / "none.jsonl")]),
    ("label-names-instruction", "data.label_names", lambda t: ["--data.label_names", "no,yes"]),
    ("label-without-name", "data.label_names",
     lambda t: [*MICRO, "--dataset", write(t / "c.csv", "text,label\n" + "t,2\n" * 30), "--data.format",
                "classification", "--data.label_names", "no,yes"]),
    ("ds-train-batch-size", "ds_config", lambda t: ["--ds_config", ds_config(t / "c.json", train_batch_size=64),
                                                    "--micro_batch_size", "8", "--gradient_accumulation_steps", "2"]),
    ("ds-fp16-and-bf16", "ds_config", lambda t: ["--ds_config", ds_config(t / "c.json", fp16__enabled=True)]),
    ("ds-fp16", "ds_config",
     lambda t: ["--ds_config", ds_config(t / "c.json", fp16__enabled=True, bf16__enabled=False)]),
    ("ds-micro-batch-not-int", "ds_config",
     lambda t: ["--ds_config", ds_config(t / "c.json", train_micro_batch_size_per_gpu=2.5)]),
    ("ds-offload-stage-0", "ds_config", lambda t: ["--ds_config", ds_config(
        t / "c.json", zero_optimization__stage=0, zero_optimization__offload_optimizer={"device": "cpu"})]),
    ("ds-offload-param-stage-2", "ds_config", lambda t: ["--ds_config", ds_config(
        t / "c.json", zero_optimization__offload_param={"device": "cpu"})]),
    ("ds-auto-unfilled", "ds_config",
     lambda t: ["--ds_config", ds_config(t / "c.json", zero_optimization__reduce_bucket_size="auto")]),
    ("ds-section-not-object", "ds_config", lambda t: ["--ds_config", ds_config(t / "c.json", bf16=True)]),
    ("ds-optimizer-section", "ds_config",
     lambda t: ["--ds_config", ds_config(t / "c.json", optimizer={"type": "Adam"})]),
    ("ds-not-json", "ds_config", lambda t: ["--ds_config", write(t / "c.json", "{stage: 2")]),
]


@pytest.mark.parametrize(("setting", "build"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(train_main, tmp_path, capsys, setting, build):
    out = tmp_path / "out"
    code = train_main([*build(tmp_path), "--output_dir", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {setting}"), lines
    assert not out.exists()


# What the checks of a builtin model and data never need (issue 13: a refusal in a few seconds).
HEAVY = ("deepspeed", "datasets", "accelerate", "transformers.modeling_utils", "torch._dynamo", "torch._inductor")


@pytest.mark.parametrize(("argv", "setting"), [
    (["--adapter.target_modules", "q_proj,c_attn"], "adapter.target_modules"),  # model_checks, builtin skeleton
    (["--method", "bilora_sam", "--adapter.aux_rank", "300"], "adapter.aux_rank"),
    (["--micro_batch_size", "4096"], "micro_batch_size"),  # check_data, before the model's checks
], ids=["target", "rank", "batch"])
def test_a_refusal_imports_neither_deepspeed_nor_the_model_code(tmp_path, argv, setting):
    """A bad adapter or batch setting with the builtin model and data is refused before DeepSpeed,
    datasets, accelerate, transformers' modelling code or torch's compilers are imported (-X
    importtime lists every module the process imports)."""
    import subprocess
    import sys

    from launch_helpers import cpu_env

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-X", "importtime", "launch/train.py", *argv, "--output_dir", str(out)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and lines[-1].startswith(f"error: {setting}: "), result.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "ds_bilevel.validation"} <= modules  # the listing is complete
    assert not sorted(m for m in modules if m.startswith(HEAVY)), "imported before the refusal"
    assert not out.exists()


def folder_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def existing_run(tmp_path):
    """An output folder that holds a run and a checkpoint marker, as a resumed run finds it."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step2")
    (out / "checkpoints" / "step2" / "ds_bilevel_manifest.json").write_text('{"tag": "step2", "files": {}}')
    (out / "sentinel.txt").write_text("untouched")
    return out, folder_digest(out)


@pytest.mark.parametrize(("argv", "setting"), [
    ([], "output_dir"),  # a non-empty folder without --resume or --overwrite
    (["--resume_from_checkpoint", "missing"], "resume_from_checkpoint"),
    (["--resume_from_checkpoint", "latest", "--adapter.rank", "100", *MICRO], "adapter.rank"),
], ids=["non-empty", "no-checkpoint", "resume-bad-rank"])
def test_existing_output_folder_stays_byte_identical(train_main, tmp_path, capsys, argv, setting):
    out, before = existing_run(tmp_path)
    assert train_main([*argv, "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {setting}: ")
    assert folder_digest(out) == before


def launcher_errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.launcher
def test_launcher_counts_every_rank_in_the_global_batch(tmp_path):
    """4 x 2 x 1 rank = 8 fits 12 examples; 4 x 2 x 2 ranks = 16 does not: only the launched run
    knows the world size. Every rank refuses; the line is printed once (by rank 0); the launcher exits 2;
    nothing written."""
    out = tmp_path / "never"
    result = launch([*MICRO, "--dataset", jsonl(tmp_path / "d.jsonl", 20), "--data.eval_size", "8",
                     "--micro_batch_size", "4", "--output_dir", str(out)], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = launcher_errors(result)
    assert len(errors) == 1, errors  # once, not once per rank (issue 18)
    assert errors[0].startswith("error: micro_batch_size: 4 x gradient_accumulation_steps 2 x 2 rank(s) = 16")
    assert not out.exists()


@pytest.mark.launcher
def test_launcher_resume_with_bad_data_leaves_the_run_folder_identical(tmp_path):
    out, before = existing_run(tmp_path)
    result = launch([*MICRO, "--dataset", jsonl(tmp_path / "d.jsonl", 40, question="q{i}", response="a{i}"),
                     "--resume_from_checkpoint", "latest", "--output_dir", str(out)], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = launcher_errors(result)
    assert len(errors) == 1 and errors[0].startswith("error: data.prompt_field: 'prompt' is not a field of"), errors
    assert "its fields are ['question', 'response']" in errors[0]
    assert folder_digest(out) == before


def saved_run(tmp_path, schedule: dict, position: int, inner_done: int):
    """An output folder whose latest checkpoint's manifest records the schedule it was saved in."""
    out = tmp_path / "run"
    tag = f"step{inner_done}"
    (out / "checkpoints" / tag).mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(tag)
    manifest = {"tag": tag, "files": {}, "schedule": schedule, "position": position, "inner_done": inner_done}
    (out / "checkpoints" / tag / "ds_bilevel_manifest.json").write_text(json.dumps(manifest))
    return out


LORA_4 = {"mode": "one_level", "max_steps": 4, "unroll_steps": 1, "outer_steps": 1, "retrain_steps": 0}
# 4 bi-level inner steps (each with an outer step: 8 events), then 1 of 2 retraining steps
BIDORA_RETRAIN = {"mode": "bilevel", "max_steps": 4, "unroll_steps": 1, "outer_steps": 1, "retrain_steps": 2}


@pytest.mark.parametrize(("saved", "position", "done", "argv", "message"), [
    (LORA_4, 4, 4, ["--max_steps", "3"], "(max_steps 4 -> 3); allowed: the same method, unroll_steps and "
     "outer_steps, and max_steps >= 4"),
    (LORA_4, 4, 4, ["--method", "bidora", "--max_steps", "8"], "(mode one_level -> bilevel, max_steps 4 -> 8)"),
    (BIDORA_RETRAIN, 9, 5, ["--method", "bidora", "--max_steps", "6", "--bilevel.retrain_steps", "2"],
     "(max_steps 4 -> 6); allowed: the same method, unroll_steps and outer_steps, and max_steps 4 (the "
     "retraining phase had begun"),
], ids=["fewer-steps", "other-method", "longer-bilevel-phase-in-retraining"])
def test_resume_into_another_schedule_is_refused(train_main, tmp_path, capsys, saved, position, done, argv, message):
    out = saved_run(tmp_path, saved, position, done)
    before = folder_digest(out)
    assert train_main([*argv, "--resume_from_checkpoint", "latest", "--output_dir", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resume_from_checkpoint: ") and message in lines[0], lines
    assert folder_digest(out) == before


@pytest.mark.parametrize(("saved", "position", "done", "argv"), [
    (LORA_4, 4, 4, ["--max_steps", "8"]),  # a finished run, trained further
    (BIDORA_RETRAIN, 9, 5, ["--method", "bidora", "--max_steps", "4", "--bilevel.retrain_steps", "5"]),
])
def test_resume_with_more_steps_passes_the_schedule_check(tmp_path, saved, position, done, argv):
    from ds_bilevel.checkpoint import check_schedule
    from ds_bilevel.config import load_config
    from ds_bilevel.validation import training_mode

    out = saved_run(tmp_path, saved, position, done)
    run = load_config([*argv, "--output_dir", str(out)])
    check_schedule(out / "checkpoints" / f"step{done}", training_mode(run), run)  # no error


# ---- the DeepSpeed JSON's own values (precedence: flag > YAML > JSON > default) ------------------
class Handed(Exception):
    """Raised instead of training: carries what launch/train.py handed to the recipe."""


@pytest.fixture()
def handed(monkeypatch):
    def capture(run, ds, *_):
        raise Handed(run, ds)

    monkeypatch.setattr("ds_bilevel.recipe.TrainingRecipe", capture)


def yaml_file(tmp_path, text: str) -> list[str]:
    return ["--config", write(tmp_path / "run.yaml", text)]


# (id, JSON values, other argv, world size, expected (micro_batch_size, gradient_accumulation_steps, max_grad_norm))
TAKEN = [
    ("micro", {"train_micro_batch_size_per_gpu": 2}, [], 1, (2, 2, 1.0)),
    ("accumulation", {"gradient_accumulation_steps": 4}, [], 1, (8, 4, 1.0)),
    ("clipping", {"gradient_clipping": 0.25}, [], 1, (8, 2, 0.25)),
    ("clipping-off", {"gradient_clipping": 0}, [], 1, (8, 2, 0.0)),
    ("micro-and-global", {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 12}, [], 2, (3, 2, 1.0)),
    ("accumulation-and-global", {"gradient_accumulation_steps": 3, "train_batch_size": 12}, [], 2, (2, 3, 1.0)),
    ("global-only", {"train_batch_size": 12}, [], 2, (6, 1, 1.0)),  # DeepSpeed's reading: accumulation 1
    ("global-and-flag", {"train_batch_size": 16}, ["--micro_batch_size", "2"], 2, (2, 4, 1.0)),
    ("flag-agrees", {"train_micro_batch_size_per_gpu": 2}, ["--micro_batch_size", "2"], 1, (2, 2, 1.0)),
    ("json-fills-what-yaml-leaves", {"gradient_accumulation_steps": 4, "gradient_clipping": 0.5},
     "micro_batch_size: 2\nmax_grad_norm: 0.5\n", 1, (2, 4, 0.5)),
]


@pytest.mark.parametrize(("changes", "argv", "world", "expected"), [c[1:] for c in TAKEN], ids=[c[0] for c in TAKEN])
def test_ds_config_values_are_taken(train_main, handed, tmp_path, monkeypatch, changes, argv, world, expected):
    """A value the JSON sets and no flag or YAML does is the run's: in the settings handed to the
    recipe (which writes them to run_config.json) and in the filled DeepSpeed config."""
    from ds_bilevel.config import config_to_dict

    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = yaml_file(tmp_path, argv) if isinstance(argv, str) else argv
    with pytest.raises(Handed) as caught:
        train_main(["--ds_config", ds_config(tmp_path / "c.json", **changes), *argv,
                    "--output_dir", str(tmp_path / "out")])
    run, filled = caught.value.args
    micro, accumulation, clipping = expected
    saved = config_to_dict(run)  # what recipe.setup writes to run_config.json
    assert (saved["micro_batch_size"], saved["gradient_accumulation_steps"], saved["max_grad_norm"]) == expected
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["gradient_clipping"]) == expected
    assert filled["train_batch_size"] == micro * accumulation * world


# (id, JSON values, other argv (a str: YAML), world size, what the line must hold, in order)
CONFLICTS = [
    ("micro-flag", {"train_micro_batch_size_per_gpu": 2}, ["--micro_batch_size", "4"], 1,
     ["train_micro_batch_size_per_gpu = 2 in ", "disagrees with micro_batch_size = 4 from the command line"]),
    ("accumulation-yaml", {"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: 3\n", 1,
     ["gradient_accumulation_steps = 4 in ", "disagrees with gradient_accumulation_steps = 3 from the config file "]),
    ("clipping-flag", {"gradient_clipping": 0.5}, ["--max_grad_norm", "2"], 1,
     ["gradient_clipping = 0.5 in ", "disagrees with max_grad_norm = 2.0 from the command line"]),
    ("inconsistent-triple", {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2,
                             "gradient_accumulation_steps": 2}, [], 2,
     ["train_batch_size = 12 in ", "disagrees with micro_batch_size 2 (from the DeepSpeed config's "
      "train_micro_batch_size_per_gpu) x gradient_accumulation_steps 2 (from the DeepSpeed config's "
      "gradient_accumulation_steps) x 2 rank(s) = 8"]),
    ("global-against-flags", {"train_batch_size": 12}, ["--micro_batch_size", "4", "--gradient_accumulation_steps",
                                                        "2"], 1,
     ["train_batch_size = 12 in ", "micro_batch_size 4 (from the command line) x gradient_accumulation_steps 2 "
      "(from the command line) x 1 rank(s) = 8"]),
    ("global-not-a-multiple", {"train_batch_size": 12}, ["--micro_batch_size", "5"], 1,
     ["train_batch_size = 12 in ", "is not a multiple of micro_batch_size 5 x 1 rank(s)"]),
    ("fp16", {"fp16": {"enabled": True}, "bf16": {"enabled": False}}, [], 1,
     ["fp16.enabled = true; fp16 is not supported: its dynamic loss scale", "allowed: bf16"]),
    ("scheduler", {"scheduler": {"type": "WarmupLR"}}, [], 1,
     ["the 'scheduler' section is not supported (", "set --lr_scheduler (linear, cosine, constant), --warmup_ratio"]),
]


@pytest.mark.parametrize(("changes", "argv", "world", "parts"), [c[1:] for c in CONFLICTS],
                         ids=[c[0] for c in CONFLICTS])
def test_ds_config_conflicts_are_one_line_naming_both(train_main, tmp_path, capsys, monkeypatch, changes, argv,
                                                      world, parts):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = yaml_file(tmp_path, argv) if isinstance(argv, str) else argv
    out = tmp_path / "out"
    code = train_main(["--ds_config", ds_config(tmp_path / "c.json", **changes), *argv, "--output_dir", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ds_config: "), lines
    position = 0
    for part in parts:
        assert part in lines[0][position:], (part, lines[0])
        position = lines[0].index(part, position) + len(part)
    assert not out.exists()


# ---- use_liger_kernel / torch_compile (issue 13 item 4): refused where they cannot run ----------
KERNEL_REFUSALS = [
    ("liger-cpu", ["--use_liger_kernel", "true"], "use_liger_kernel: true, but Liger Kernel's Triton kernels need a "
     "CUDA GPU (DS_ACCELERATOR=cpu is not a CUDA device); allowed: false"),
    ("compile-cpu", ["--torch_compile", "true"], "torch_compile: true, but compiled layers are supported on a CUDA "
     "GPU only (DS_ACCELERATOR=cpu is not a CUDA device); allowed: false"),
    ("liger-encoder", ["--use_liger_kernel", "true", "--model_name_or_path", "builtin:tiny-roberta",
                       "--data.format", "classification"],
     "use_liger_kernel: true, but Liger Kernel is applied to the llama/mistral/qwen2 families only, not to "
     "model_type 'roberta'; allowed: false"),
    # the loss inside the output head (loss_head.py): a causal LM only, its head not adapted
    ("lce-encoder", ["--linear_cross_entropy", "true", "--model_name_or_path", "builtin:tiny-roberta",
                     "--data.format", "classification"],
     f"linear_cross_entropy: true, but the loss without logits is supported for model types "
     f"{', '.join(SUPPORTED_MODEL_TYPES)}, whose forward returns the output head's result unchanged; not for "
     f"'roberta'; allowed: false"),
    ("lce-head-adapted", ["--linear_cross_entropy", "true", "--adapter.target_modules", "q_proj,lm_head"],
     "linear_cross_entropy: true, but the output head is an adapter target (adapter.target_modules), so it "
     "cannot compute the loss; allowed: false"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in KERNEL_REFUSALS], ids=[c[0] for c in KERNEL_REFUSALS])
def test_kernel_settings_are_refused_where_they_cannot_run(train_main, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "out"
    code = train_main([*argv, "--output_dir", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == [f"error: {message}"], lines
    assert not out.exists()


def test_liger_not_installed_is_refused(train_main, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ds_bilevel.kernels._cuda_device", lambda: None)  # a GPU, but no liger-kernel
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    out = tmp_path / "out"
    code = train_main(["--use_liger_kernel", "true", "--output_dir", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == ['error: use_liger_kernel: true, but liger-kernel is not installed '
                                   '(pip install ".[gpu]"); allowed: false'], lines


@pytest.mark.parametrize(("bf16", "native", "warned"),
                         [(True, False, True), (True, True, False), (False, False, False)])
def test_emulated_bf16_is_warned_once_before_launch(monkeypatch, bf16, native, warned):
    """bf16 on a CPU without bf16 arithmetic is allowed (the numbers are right) but said, naming the field."""
    import torch

    from ds_bilevel import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warning = precision.emulated_bf16_warning({"bf16": {"enabled": bf16}})
    assert (warning is not None) is warned
    if warned:
        assert warning.startswith("bf16.enabled = true on a CPU without bf16 arithmetic")
        assert "cpu_zero2.json" in warning



@pytest.mark.parametrize(("method", "hypergrad", "bf16", "warned"), [
    ("bidora", "darts", True, True), ("bilora", "cg", True, True), ("bidora", "first_order", True, False),
    ("bidora", "darts", False, False), ("lora", "darts", True, False), ("bilora_sam", "neumann", True, False)])
def test_second_order_hypergradient_in_bf16_is_warned(method, hypergrad, bf16, warned):
    """Only a bi-level method with a second-order hypergradient under bf16 is told its term is mostly rounding."""
    from ds_bilevel.precision import bf16_second_order_warning

    warning = bf16_second_order_warning(hypergrad, method, {"bf16": {"enabled": bf16}})
    assert (warning is not None) is warned
    if warned:
        assert warning.startswith(f"bilevel.hypergrad {hypergrad} with bf16.enabled = true")


# ---- data.max_length against a model's learned positions -----------------------------------------
@pytest.mark.parametrize(("model", "max_length", "line"), [
    ("builtin:tiny-roberta", 256, "data.max_length: 256 exceeds builtin:tiny-roberta's 128 learned positions "
     "(model_type roberta: max_position_embeddings 132 less pad_token_id 3 + 1); allowed: at most 128"),
    ("builtin:tiny-roberta", 129, "data.max_length: 129 exceeds builtin:tiny-roberta's 128 learned positions "
     "(model_type roberta: max_position_embeddings 132 less pad_token_id 3 + 1); allowed: at most 128"),
    ("gpt2", 65, "data.max_length: 65 exceeds {folder}'s 64 learned positions (model_type gpt2: "
     "max_position_embeddings 64); allowed: at most 64"),
], ids=["roberta-256", "roberta-one-past", "gpt2-one-past"])
def test_max_length_past_the_learned_positions_is_refused(train_main, tmp_path, capsys, model, max_length, line):
    """Before: the run started, crashed in its first forward with exit 1 ("index 132 is out of
    bounds for dimension 1 with size 132") and left a locked, half-written output folder."""
    folder = gpt2_folder(tmp_path / "gpt2") if model == "gpt2" else model
    data = ["--dataset", classification_csv(tmp_path / "c.csv"), "--data.format", "classification"]
    out = tmp_path / "out"
    code = train_main(["--model_name_or_path", folder, *(data if model != "gpt2" else []),
                       "--data.max_length", str(max_length), "--output_dir", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == [f"error: {line.format(folder=folder)}"], lines
    assert not out.exists()


def check_run_with(tmp_path, model: str, max_length: int, **data) -> None:
    from ds_bilevel.config import RunConfig
    from ds_bilevel.data import DataConfig
    from ds_bilevel.validation import check_run

    run = RunConfig(model_name_or_path=model, output_dir=str(tmp_path / "out"),
                    data=DataConfig(max_length=max_length, **data))
    if data.get("format") == "classification":
        run.dataset = classification_csv(tmp_path / "c.csv")
    check_run(run, 1)


def test_max_length_at_the_limit_passes_validation(tmp_path):
    """Exactly the limit is allowed: tiny-roberta's 128, a GPT-2 folder's n_positions (64; a folder
    with its weights and tokenizer, the head untied)."""
    from families import causal_lm, config_of, write_tokenizer_files

    check_run_with(tmp_path, "builtin:tiny-roberta", 128, format="classification", eval_size=6)
    folder = tmp_path / "gpt2"
    type(causal_lm("gpt2"))(config_of("gpt2", tie_word_embeddings=False)).save_pretrained(folder)
    write_tokenizer_files(folder)
    check_run_with(tmp_path, str(folder), 64)
    with pytest.raises(ValueError, match=r"^data.max_length: 65 exceeds .*'s 64 learned positions"):
        check_run_with(tmp_path, str(folder), 65)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_a_tied_head_folder_passes_and_one_missing_its_only_copy_is_refused(tmp_path, family):
    """save_pretrained writes a tied head's weight once (GPT-2, OPT, Llama-3.2 1B/3B): the folder
    passes (before, the meta skeleton lost the tie under init_empty_weights and every such folder
    was refused as lacking lm_head.weight); without that one copy it is refused, naming both names' tensor."""
    from families import causal_lm, config_of, write_tokenizer_files
    from safetensors.torch import load_file, save_file

    model = type(causal_lm(family))(config_of(family, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = tmp_path / family
    model.save_pretrained(folder)
    write_tokenizer_files(folder)
    tensors = load_file(folder / "model.safetensors")
    assert not any(name.startswith("lm_head") for name in tensors)  # one copy, under the embedding's name
    check_run_with(tmp_path, str(folder), 32)
    embedding = next(name for name in tensors if "embed_tokens" in name or "wte" in name)
    save_file({k: v for k, v in tensors.items() if k != embedding}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^model_name_or_path: .* lacks 2 of the model's weight tensors"):
        check_run_with(tmp_path, str(folder), 32)


def test_rotary_models_are_not_limited(tmp_path):
    """LLaMA's positions are computed (rotary): a max_length past max_position_embeddings (128 for the
    builtins) is not refused; nor for a LLaMA folder's config."""
    from transformers import LlamaConfig

    from ds_bilevel.model_checks import position_limit

    check_run_with(tmp_path, "builtin:micro-llama", 1024)
    assert position_limit(LlamaConfig(max_position_embeddings=16)) is None


def test_position_limits_are_where_the_models_break():
    """For each family the tests build (families.py): a forward of position_limit tokens runs and one
    more token fails; a family with no limit runs past its max_position_embeddings."""
    import torch
    from families import CAUSAL, ENCODERS, causal_lm, classifier, config_of

    from ds_bilevel.model_checks import position_limit

    def runs(model, length: int) -> bool:
        try:
            with torch.no_grad():
                model(input_ids=torch.randint(5, 400, (1, length)))
        except (IndexError, RuntimeError):
            return False
        return True

    limits = {}
    for family in (*CAUSAL, *ENCODERS):
        limit = limits[family] = position_limit(config_of(family))
        model = causal_lm(family) if family in CAUSAL else classifier(family)
        if limit is None:
            model.config.max_position_embeddings = 16  # 24 tokens through a 16-position model: no table
            assert runs(type(model)(model.config).eval(), 24), family
        else:
            assert runs(model, limit) and not runs(model, limit + 1), family
    assert limits == {"llama": None, "gpt2": 64, "phi3": None, "gpt_neox": None, "falcon": None, "opt": 2048,
                      "mixtral": None, "bert": 64, "deberta_v2": 64, "roberta": 66}
