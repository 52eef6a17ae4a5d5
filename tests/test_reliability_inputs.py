"""Issue 17, in-process: every case ends before any process group in one line naming the setting or
file, exit code 2, and the output folder unchanged (sha256 of every file before and after); a
failed or mismatched resume never touches the run; an overwrite clears the old run first; a folder
whose files do not belong together is not exported; a second run is refused by the folder's lock.

launch/train.py's main() runs here with TrainingRecipe replaced (no training): one real run, made
once per module by ``python launch/train.py``, provides the checkpoint and the finished folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from in_process_train import MICRO, RUN, Started, load_train_entry, refused, replace_recipe
from launch_helpers import REPO
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def train():
    return load_train_entry("train_entry_reliability")


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """TrainingRecipe replaced: setup() records the folder as the run found it, then stops."""
    return replace_recipe(monkeypatch)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (1 rank) with its step-2 checkpoint, made through launch/train.py."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *RUN, "--output_dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


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


def test_a_builtin_base_is_rebuilt_only_on_the_device_type_it_was_drawn_on(finished, tmp_path, monkeypatch):
    """A GPU's generator gives a builtin other values than the CPU's from the same seed: the adapter
    file records where the run drew them, an export on a machine without that device refuses
    (before, a GPU run exported on a CPU host merged its adapters into another base, silently), and
    a resume on the other device type is refused through the base's fingerprint."""

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
