"""Issue 17, in-process: every case ends before any process group in one line naming the setting or
file, exit code 2, and the output folder unchanged (sha256 of every file before and after); a
failed or mismatched resume never touches the run; an overwrite clears the old run first; a folder
whose files do not belong together is not exported; a second run is refused by the folder's lock.

launch/train.py's main() runs here with TrainingRecipe replaced (no training): one real run, made
once per module by ``python launch/train.py``, provides the checkpoint and the finished folder."""

from __future__ import annotations

import hashlib
import importlib.util
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
from launch_helpers import REPO
from safetensors.torch import load_file, save_file

MICRO = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8",
         "--micro_batch_size", "4"]
RUN = [*MICRO, "--method", "lora", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "0"]


class Started(Exception):
    """The fake recipe's setup: validation passed and the run would have started."""


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_entry_reliability", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """TrainingRecipe replaced: setup() records the folder as the run found it, then stops."""
    monkeypatch.chdir(REPO)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class Fake:
        def __init__(self, run, ds_config, phases=None):
            seen["run"], seen["ds_config"] = run, ds_config

        def setup(self):
            out = Path(seen["run"].output_dir)
            seen["files"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            raise Started

    monkeypatch.setattr("ds_bilevel.recipe.TrainingRecipe", Fake)
    return seen


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (1 rank) with its step-2 checkpoint, made through launch/train.py."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *RUN, "--output_dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def refused(train, argv, capsys, starts: str, folder: Path | None = None, *contains: str) -> str:
    """main(argv) exits 2 with exactly one line starting ``error: <starts>`` and ``folder`` unchanged."""
    before = snapshot(folder) if folder is not None else None
    code = train.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {starts}"), (code, lines)
    for part in contains:
        assert part in lines[0], (part, lines[0])
    if folder is not None:
        assert snapshot(folder) == before
    return lines[0]


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- resume: checked before launch against the checkpoint, folder unchanged ---------------------
RESUME_MISMATCH = [
    ("method", ["--method", "dora"], "adapter.method 'lora' (this run: 'dora')"),
    ("method-bilevel", ["--method", "bidora"], "adapter.method 'lora' (this run: 'bidora')"),
    ("rank", ["--adapter.rank", "4"], "adapter.rank 8 (this run: 4)"),
    ("targets", ["--adapter.target_modules", "q_proj,v_proj"], "adapter.target_modules ['all-linear']"),
    ("zero-stage", ["--ds_config", "ds_configs/cpu_zero3.json"], "zero_optimization.stage 2 (this run: 3)"),
    ("world-size", ["WORLD_SIZE=2"], "world size 1 (this run: 2)"),
    ("max-steps-below", ["--max_steps", "1"], "max_steps 2 -> 1"),
    ("model", ["--seed", "1"], "the base model (fingerprint"),
    # what decides which examples each step after the checkpoint reads
    ("global-batch", ["--micro_batch_size", "2"], "global batch size (micro_batch_size x"),
    ("train-size", ["--data.train_size", "48"], "data.train_size 64 (this run: 48)"),
    ("max-length", ["--data.max_length", "16"], "data.max_length 64 (this run: 16)"),
]


@pytest.mark.parametrize(("change", "part"), [c[1:] for c in RESUME_MISMATCH], ids=[c[0] for c in RESUME_MISMATCH])
def test_a_resume_that_does_not_fit_the_checkpoint_changes_nothing(train, finished, tmp_path, capsys, monkeypatch,
                                                                    change, part):
    out = copy_run(finished, tmp_path)
    argv = [*RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    for item in change:
        if item.startswith("WORLD_SIZE="):
            monkeypatch.setenv("WORLD_SIZE", item.split("=")[1])
        else:
            argv.append(item)
    refused(train, argv, capsys, "resume_from_checkpoint: ", out, part)


def test_a_resume_that_fits_starts(train, finished, tmp_path, no_training):
    out = copy_run(finished, tmp_path)
    with pytest.raises(Started):
        train.main([*RUN, "--max_steps", "4", "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert "run_manifest.json" not in no_training["files"]  # the folder is no longer a finished run
    assert "ds_bilevel.lock" in no_training["files"]


def test_a_resume_with_the_same_global_batch_split_otherwise_starts(train, finished, tmp_path, no_training):
    """Micro batch 2 x accumulation 4 reads the same examples per step as 4 x 2 (the run's): allowed."""
    out = copy_run(finished, tmp_path)
    with pytest.raises(Started):
        train.main([*RUN, "--micro_batch_size", "2", "--gradient_accumulation_steps", "4", "--max_steps", "4",
                    "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def test_an_edited_data_file_is_refused_on_resume(train, tmp_path, capsys, no_training):
    """A data file changed between launches is another dataset: its sha256 is in the checkpoint's facts."""
    from ds_bilevel.builtin.task import make_split

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_split(seed=0, size=80)))
    out = tmp_path / "run"
    argv = [*RUN, "--dataset", str(data), "--data.eval_size", "8", "--output_dir", str(out)]
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    data.write_text(data.read_text() + json.dumps(make_split(seed=1, size=1)[0]) + "\n")  # one row more
    refused(train, [*argv, "--max_steps", "4", "--resume_from_checkpoint", "latest"], capsys,
            "resume_from_checkpoint: ", out, "dataset (its name and bytes)")


def test_a_resume_from_another_runs_checkpoint_into_a_run_folder(train, finished, tmp_path, capsys, no_training):
    """Resuming another folder's checkpoint into a folder that holds a run would overwrite its adapters and
    summary and mix two runs' metrics: refused, folder unchanged; with --overwrite_output_dir the old run goes
    first; into an empty folder it starts."""
    other = copy_run(finished, tmp_path / "other")
    checkpoint = str(finished / "checkpoints" / "step2")
    refused(train, [*RUN, "--output_dir", str(other), "--resume_from_checkpoint", checkpoint], capsys,
            "output_dir: ", other, "holds another run and resume_from_checkpoint")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Started):
        train.main([*RUN, "--max_steps", "4", "--output_dir", str(other), "--resume_from_checkpoint", checkpoint,
                    "--overwrite_output_dir", "true"])
    assert no_training["files"] == ["ds_bilevel.lock", "notes.txt"]  # the old run's files, checkpoints too
    with pytest.raises(Started):
        train.main([*RUN, "--max_steps", "4", "--output_dir", str(tmp_path / "empty"),
                    "--resume_from_checkpoint", checkpoint])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("flipped-bytes", lambda ckpt: flip_bytes(next(ckpt.glob("*optim_states.pt"))), "is damaged (its sha256 differs"),
    ("manifest-list", lambda ckpt: (ckpt / "ds_bilevel_manifest.json").write_text("[1, 2]"), "is corrupt"),
    ("manifest-not-json", lambda ckpt: (ckpt / "ds_bilevel_manifest.json").write_text("{"), "is corrupt"),
    ("files-not-object", lambda ckpt: (ckpt / "ds_bilevel_manifest.json").write_text('{"files": 3}'), "is corrupt"),
]


@pytest.mark.parametrize(("damage", "part"), [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_a_damaged_checkpoint_is_refused(train, finished, tmp_path, capsys, damage, part):
    out = copy_run(finished, tmp_path)
    damage(out / "checkpoints" / "step2")
    refused(train, [*RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest"], capsys,
            "resume_from_checkpoint: ", out, part)


# ---- overwrite: the old run's files go before anything is written; export refuses what is left -----
def test_an_overwrite_clears_the_old_run_first_and_a_killed_one_is_not_exported(train, finished, tmp_path,
                                                                                no_training, capsys):
    from ds_bilevel.export import ExportError, export

    out = copy_run(finished, tmp_path)
    (out / "notes.txt").write_text("mine")  # not a run's file: kept
    with pytest.raises(Started):  # killed as its setup begins
        train.main([*RUN, "--adapter.alpha", "64", "--overwrite_output_dir", "true", "--output_dir", str(out)])
    assert no_training["files"] == ["ds_bilevel.lock", "notes.txt"]  # checkpoints included
    with pytest.raises(ExportError, match="holds a run that did not finish"):
        export(out, tmp_path / "export", "peft")
    assert not (tmp_path / "export").exists()
    refused(train, [*RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest"], capsys,
            "resume_from_checkpoint: 'latest' is not a checkpoint", out)  # the old run's state is gone


def test_export_refuses_files_of_different_runs(finished, tmp_path):
    from ds_bilevel.export import ExportError, export

    out = copy_run(finished, tmp_path)
    config = json.loads((out / "run_config.json").read_text())
    config["adapter"]["alpha"] = 64.0
    (out / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="run_config.json is not the file run .* wrote"):
        export(out, tmp_path / "export", "peft")
    out = copy_run(finished, tmp_path / "b")
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"method": "lora"})
    with pytest.raises(ExportError, match="adapter_model.safetensors is not the file run"):
        export(out, tmp_path / "export", "peft")
    assert not (tmp_path / "export").exists()
    assert export(finished, tmp_path / "good", "peft").is_dir()  # the untouched run exports


# ---- the lock ------------------------------------------------------------------------------------------
def lock_of(pid: int, folder: Path) -> None:
    from ds_bilevel.files import LOCK, _start_time

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid),
                                           "started": "2026-01-01 00:00:00", "command": "train.py (other)"}))


def test_a_folder_in_use_is_refused_naming_the_holder(train, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        lock_of(holder.pid, out)
        refused(train, [*MICRO, "--output_dir", str(out)], capsys, "output_dir: ", out,
                f"is in use by another run (pid {holder.pid} on {socket.gethostname()}", "train.py (other)")
    finally:
        holder.kill()
        holder.wait()


def test_a_later_rank_of_the_same_launch_is_not_refused_by_its_rank_0s_lock(tmp_path, monkeypatch):
    """Rank 0 locks the folder once its checks pass; another node's ranks, started seconds later,
    found that lock held by a live process and refused their own run (a two-"node" launch on this
    machine hit it: "output_dir: ... is in use by another run (pid <rank 0>)"). Only a lock of this
    launch (MASTER_ADDR:MASTER_PORT) written by rank 0 is exempt, and only for the other ranks."""
    from ds_bilevel.files import _start_time, lock_holder, take_lock

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        launch = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511", "WORLD_SIZE": "2"}
        for name, value in {**launch, "RANK": "0"}.items():
            monkeypatch.setenv(name, value)
        take_lock(out, "run0")  # rank 0 of the launch, as claim_output_dir does
        lock = json.loads((out / "ds_bilevel.lock").read_text())
        assert lock["launch"] == "10.0.0.1:29511"
        (out / "ds_bilevel.lock").write_text(json.dumps({**lock, "pid": holder.pid,  # rank 0 is another process
                                                         "start_time": _start_time(holder.pid)}))
        monkeypatch.setenv("RANK", "1")
        assert lock_holder(out) is None  # rank 1 of the same launch: its own run
        monkeypatch.setenv("MASTER_PORT", "29512")
        assert lock_holder(out)["pid"] == holder.pid  # rank 1 of another launch: held
        monkeypatch.setenv("MASTER_PORT", "29511")
        monkeypatch.setenv("RANK", "0")
        assert lock_holder(out)["pid"] == holder.pid  # rank 0 never takes another process's lock as its own
        lock_of(holder.pid, out)  # a lock written before locks named their launch
        monkeypatch.setenv("RANK", "1")
        assert lock_holder(out)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over(train, tmp_path, no_training):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    lock_of(gone.pid, out)
    with pytest.raises(Started):
        train.main([*MICRO, "--output_dir", str(out)])
    assert json.loads((out / "ds_bilevel.lock").read_text())["pid"] == os.getpid()


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


def test_a_builtin_base_is_rebuilt_only_on_the_device_type_it_was_drawn_on(finished, tmp_path, monkeypatch):
    """A GPU's generator gives a builtin other values than the CPU's from the same seed: the adapter
    file records where the run drew them, an export on a machine without that device refuses
    (before, a GPU run exported on a CPU host merged its adapters into another base, silently), and
    a resume on the other device type is refused through the base's fingerprint."""
    import hashlib

    from safetensors import safe_open

    from ds_bilevel.export import ExportError, export
    from ds_bilevel.files import model_fingerprint

    with safe_open(str(finished / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["builtin_drawn_on"] == "cpu"
        metadata = f.metadata()
    tensors = load_file(finished / "adapter_model.safetensors")
    out = copy_run(finished, tmp_path)
    save_file(tensors, out / "adapter_model.safetensors", metadata={**metadata, "builtin_drawn_on": "cuda"})
    (out / "run_manifest.json").unlink()  # the file no longer is the one the run recorded
    with pytest.raises(ExportError, match=r"was drawn on a GPU .* export it on a machine with a GPU"):
        export(out, tmp_path / "export", "merged")
    assert not (tmp_path / "export").exists()
    # the CPU's fingerprint is the one recorded before the device was part of it: old checkpoints resume
    from ds_bilevel.checkpoint import run_facts
    from ds_bilevel.config import config_from_flat

    cpu = model_fingerprint("builtin:micro-llama", 0)
    assert cpu == hashlib.sha256(b"builtin:micro-llama seed 0").hexdigest()[:16]
    run = config_from_flat({"model_name_or_path": "builtin:micro-llama"})
    assert run_facts(run, {}, 1)["model"] == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_facts(run, {}, 1)["model"] == model_fingerprint("builtin:micro-llama", 0, "cuda") != cpu
