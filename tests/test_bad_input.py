"""Issue 17, in-process: bad input (a damaged model folder, data files of the wrong shape, settings
out of range) ends before any process group in one line naming the setting or file, exit code 2,
with the output folder unchanged; non-finite losses and NaN base weights fail before any output
is written. launch/train.py's main() runs with TrainingRecipe replaced (tests/in_process_train.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from in_process_train import MICRO, RUN, Started, load_train_entry, refused, replace_recipe
from launch_helpers import REPO
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def train():
    return load_train_entry("train_entry_bad_input")


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """TrainingRecipe replaced: setup() records the folder as the run found it, then stops."""
    return replace_recipe(monkeypatch)


# ---- bad input: one line before launch ----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """builtin:micro-llama saved as an HF folder (weights in 2 shards) with its tokenizer."""
    from ds_bilevel.builtin.model import build_builtin_model
    from ds_bilevel.models import load_tokenizer

    folder = tmp_path_factory.mktemp("model") / "micro"
    tokenizer = load_tokenizer("builtin:micro-llama")
    build_builtin_model("builtin:micro-llama", len(tokenizer), seed=0).save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    return folder


def shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header = change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # same length: only the lie differs
    assert len(text) == length
    path.write_bytes(data[:8] + text + data[8 + length:])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def lie_shape(header):
    header[first_tensor(header)]["shape"][0] += 1
    return header


def lie_dtype(header):
    header[first_tensor(header)]["dtype"] = "F64"
    return header


def retensor(path: Path, change) -> None:
    tensors = load_file(path)
    save_file(change(tensors), str(path), metadata={"format": "pt"})


def drop_one(tensors):
    tensors.pop(sorted(tensors)[-1])
    return tensors


def wrong_shape(tensors):
    name = sorted(tensors)[-1]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    return tensors


def rename_index(folder: Path):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = shard(folder).name
    index["weight_map"] = {k: name for k in index["weight_map"]} | {"extra.weight": "model-99-of-99.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


MODEL_DAMAGE = [
    ("missing-tensor", lambda f: (retensor(shard(f), drop_one), (f / "model.safetensors.index.json").unlink()),
     "lacks 1 of the model's weight tensors"),
    ("unexpected-tensor", lambda f: (retensor(shard(f), lambda t: {**t, "model.extra.weight": torch.zeros(2)}),
                                     (f / "model.safetensors.index.json").unlink()), "holds 1 tensor(s) the model"),
    ("wrong-shape", lambda f: (retensor(shard(f), wrong_shape), (f / "model.safetensors.index.json").unlink()),
     "with shape"),
    ("header-shape-lie", lambda f: rewrite_header(shard(f), lie_shape), "has a corrupt safetensors header: tensor"),
    ("header-dtype-lie", lambda f: rewrite_header(shard(f), lie_dtype), "has a corrupt safetensors header: tensor"),
    ("header-list", lambda f: rewrite_header(shard(f), lambda h: [1]), "has a corrupt safetensors header (a JSON list"),
    ("no-tokenizer", lambda f: [p.unlink() for p in f.glob("tokenizer*")], "has no tokenizer"),
    ("missing-shard", lambda f: shard(f).unlink(), "is missing (1 of the 3 shards"),
    ("index-not-json", lambda f: (f / "model.safetensors.index.json").write_text("{"), "is not a valid index"),
    ("shard-not-in-index", rename_index, "model-99-of-99.safetensors is missing"),
    ("config-not-json", lambda f: (f / "config.json").write_text("{'a': 1"), "config.json is not valid JSON"),
    ("config-a-list", lambda f: (f / "config.json").write_text("[1]"), "holds a JSON list"),
]


@pytest.mark.parametrize(("damage", "part"), [c[1:] for c in MODEL_DAMAGE], ids=[c[0] for c in MODEL_DAMAGE])
def test_a_damaged_model_folder_is_refused(train, model_folder, tmp_path, capsys, damage, part):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    damage(folder)
    out = tmp_path / "out"
    refused(train, ["--model_name_or_path", str(folder), "--output_dir", str(out)], capsys,
            "model_name_or_path: ", None, part)
    assert not out.exists()


def test_an_intact_model_folder_passes(train, model_folder, tmp_path):
    with pytest.raises(Started):
        train.main(["--model_name_or_path", str(model_folder), "--output_dir", str(tmp_path / "out")])


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def text_rows(n=40, bad_at=(), bad=None, field="response"):
    return [{"prompt": f"q{i}", "response": f"a{i}", **({field: bad} if i in bad_at else {})} for i in range(n)]


def label_rows(n=40, bad_at=(), bad=None):
    return [{"text": f"t{i}", "label": bad if i in bad_at else i % 2} for i in range(n)]


CLASSIFY = ["--data.format", "classification"]
# (id, setting the line starts with, argv given a tmp folder, a part of the line)
BAD = [
    ("max-grad-norm-nan", "max_grad_norm", lambda t: ["--max_grad_norm", "nan"], "is not a finite number"),
    ("hypergrad-eps-inf", "bilevel.hypergrad_eps", lambda t: ["--method", "bidora", "--bilevel.hypergrad_eps", "inf"],
     "is not a finite number"),
    ("learning-rate-inf", "learning_rate", lambda t: ["--learning_rate", "inf"], "is not a finite number"),
    ("outer-learning-rate-nan", "bilevel.outer_learning_rate", lambda t: ["--bilevel.outer_learning_rate", "nan"],
     "is not a finite number"),
    ("weight-decay-nan", "weight_decay", lambda t: ["--weight_decay", "nan"], "is not a finite number"),
    ("alpha-inf", "adapter.alpha", lambda t: ["--adapter.alpha", "inf"], "is not a finite number"),
    ("yaml-nan", "max_grad_norm", lambda t: ["--config", write(t / "r.yaml", "max_grad_norm: .nan\n")], "finite"),
    ("yaml-syntax", "config: ", lambda t: ["--config", write(t / "r.yaml", "adapter: {rank: 8\nseed: [\n")],
     "is not valid YAML"),
    ("max-length-1", "data.max_length", lambda t: ["--data.max_length", "1"], "allowed: an integer >= 2"),
    ("null-response", "data.response_field", lambda t: ["--dataset", jsonl(t / "d.jsonl", text_rows(bad_at=(3, 9)))],
     "is null ('None') in 2 of 40 rows (first at row 4"),
    ("list-response", "data.response_field",
     lambda t: ["--dataset", jsonl(t / "d.jsonl", text_rows(bad_at=(5,), bad=["x"]))], "is a list"),
    ("dict-prompt", "data.prompt_field",
     lambda t: ["--dataset", jsonl(t / "d.jsonl", text_rows(bad_at=(0,), bad={"a": 1}, field="prompt"))],
     "is an object"),
    ("number-response", "data.response_field",
     lambda t: ["--dataset", jsonl(t / "d.jsonl", text_rows(bad_at=range(40), bad=7))], "is a number"),
    ("empty-responses", "data.response_field",
     lambda t: ["--dataset", jsonl(t / "d.jsonl", text_rows(bad_at=range(40), bad="  "))], "nothing to learn"),
    ("null-label", "data.label_field",
     lambda t: [*CLASSIFY, "--dataset", jsonl(t / "d.jsonl", label_rows(bad_at=(7,)))], "is null"),
    ("float-label", "data.label_field",
     lambda t: [*CLASSIFY, "--dataset", jsonl(t / "d.jsonl", label_rows(bad_at=(2,), bad=0.5))], "is a number"),
    ("mixed-labels", "data.label_field",
     lambda t: [*CLASSIFY, "--dataset", jsonl(t / "d.jsonl", label_rows(bad_at=(2,), bad="yes"))],
     "mixes integers (first at row 1) and strings (first at row 3)"),
    ("output-under-a-file", "output_dir", lambda t: ["--output_dir", str(Path(write(t / "f", "x")) / "run")],
     "is a file"),
    ("master-port-in-use", "MASTER_PORT", lambda t: [], "is in use on this machine"),
    ("stale-op-build-lock", "DeepSpeed op build", lambda t: [], "delete it (rm "),
    ("nvme-without-aio", "ds_config", lambda t: ["--ds_config", nvme_config(t)], "async I/O"),
]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def nvme_config(folder: Path) -> str:
    config = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(folder)}
    return write(folder / "nvme.json", json.dumps(config))


@pytest.mark.parametrize(("setting", "build", "part"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_before_launch(train, tmp_path, capsys, monkeypatch, setting, build, part):
    argv = [*MICRO, *build(tmp_path)]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "out")]
    blocker = None
    if setting == "MASTER_PORT":
        blocker = socket.socket()
        blocker.bind(("", 0))
        blocker.listen()
        monkeypatch.setenv("MASTER_PORT", str(blocker.getsockname()[1]))
    if setting == "DeepSpeed op build":
        lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(lock.parent.parent))
    if setting == "ds_config":
        monkeypatch.setattr("deepspeed.ops.op_builder.AsyncIOBuilder.is_compatible", lambda *a, **k: False)
    try:
        refused(train, argv, capsys, setting, None, part)
    finally:
        if blocker is not None:
            blocker.close()
    assert not (tmp_path / "out").exists()


def test_a_small_file_trains_with_a_tenth_held_out(train, tmp_path, no_training):
    """Issue 18: data.eval_size not given, a 30-row file: 3 rows held out (10%), not a refusal."""
    data = jsonl(tmp_path / "d.jsonl", text_rows(30))
    with pytest.raises(Started):
        train.main([*MICRO[:2], "--dataset", data, "--micro_batch_size", "2", "--output_dir", str(tmp_path / "o")])
    assert no_training["run"].data.eval_size == 3


def test_non_finite_losses_fail_before_the_outputs_are_written(train, tmp_path, capsys, monkeypatch):
    """A run whose losses are NaN (NaN base weights, an infinite alpha) exits 1 with the documented
    line; its adapters and summary are not written and the folder stays unexported (locked)."""
    saved = []

    class NaNRun:
        rank = 0

        def __init__(self, run, ds_config, phases=None):
            self.run = run

        def setup(self):
            Path(self.run.output_dir).mkdir(exist_ok=True)

        def train(self):
            return {"eval_loss_before": float("nan"), "eval_loss_after": float("nan"), "train_loss_first": 1.0,
                    "train_loss_last": float("nan")}

        def save(self, summary):
            saved.append(summary)

    monkeypatch.setattr("ds_bilevel.recipe.TrainingRecipe", NaNRun)
    monkeypatch.setattr("ds_bilevel.distributed.release_shm_buffers", lambda: 0)
    out = tmp_path / "out"
    code = train.main([*MICRO, "--output_dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: the run ended with non-finite losses (eval_loss_before nan, eval_loss_after "
                               "nan, train_loss_last nan)"), lines
    assert not saved and not (out / "run_manifest.json").exists() and (out / "ds_bilevel.lock").exists()


def test_nan_base_weights_stop_the_run_before_its_first_step(tmp_path):
    """A base folder holding NaN weights passes every check of its files, and the evaluation before
    training finds it: exit 1 with one line, no step taken, no adapters, no checkpoint."""
    from ds_bilevel.builtin.model import build_builtin_model
    from ds_bilevel.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:micro-llama")
    model = build_builtin_model("builtin:micro-llama", len(tokenizer), seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = tmp_path / "out"
    command = [sys.executable, "launch/train.py", *RUN[2:], "--model_name_or_path", str(tmp_path / "model"),
               "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: the evaluation before training gave a non-finite loss (eval_loss nan)")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "checkpoints").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0]  # the evaluation before training, and no step after it


