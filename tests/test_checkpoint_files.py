"""checkpoint.save's files and renames, with a stand-in for DeepSpeed's engine (no process group):
a job killed at any point of saving a step again leaves ``latest`` resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ds_bilevel import checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would, one file, with ``content``."""

    def __init__(self, content: bytes):
        self.content = content

    def save_checkpoint(self, folder, tag, **_):
        Path(folder, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"content": self.content}, Path(folder, tag, MODEL_STATES))


def content(folder: Path) -> bytes:
    return torch.load(folder / MODEL_STATES, weights_only=True)["content"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    import deepspeed.comm as dist

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)


def test_saving_a_step_again_replaces_it_and_leaves_nothing_aside(tmp_path):
    checkpoint.save(FakeEngine(b"old"), tmp_path, "step6", {}, rank=0)
    checkpoint.save(FakeEngine(b"new"), tmp_path, "step6", {}, rank=0)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step6"]
    assert content(folder / "step6") == b"new"
    assert (folder / "step6" / checkpoint.RNG_FILE.format(rank=0)).is_file()  # this rank's generator
    assert checkpoint.resolve("latest", tmp_path) == (folder, "step6")


def save_step6_again_killed_at(tmp_path, monkeypatch, killed_at: str) -> None:
    """step6 saved ("old"), then saved again ("new") by a job killed at the rename of ``killed_at``."""
    checkpoint.save(FakeEngine(b"old"), tmp_path, "step6", {}, rank=0)
    real_replace = os.replace

    def killed(source, target):
        if Path(source).name == killed_at:
            raise KeyboardInterrupt  # SIGKILL's stand-in
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(b"new"), tmp_path, "step6", {}, rank=0)
    monkeypatch.setattr(os, "replace", real_replace)


@pytest.mark.parametrize(("killed_at", "tag", "expected"), [
    ("step6", "step6", b"old"),            # moving the old one aside: the old one stays in place
    ("step6.partial", "step6.partial", b"new"),  # renaming the new one: the new one, complete, is found
])
def test_killed_while_saving_a_step_again_resumes(tmp_path, monkeypatch, killed_at, tag, expected):
    """A resume from an older checkpoint reaches a saved step again. Killed between the renames, the
    run used to leave ``latest`` naming a folder just deleted (a resume refused)."""
    save_step6_again_killed_at(tmp_path, monkeypatch, killed_at)
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text() == "step6"
    load_dir, found = checkpoint.resolve("latest", tmp_path, checksums=True)
    assert (load_dir, found) == (folder, tag)
    assert content(folder / found) == expected
    # the next save of that step (the resumed run reaching it) cleans up
    checkpoint.save(FakeEngine(b"newer"), tmp_path, "step6", {}, rank=0)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step6"]


@pytest.mark.parametrize("killed_at", ["step6", "step6.partial"])
def test_the_next_save_of_another_step_finishes_an_interrupted_one(tmp_path, monkeypatch, killed_at):
    """The resumed run saves later steps, not step 6 again: what the kill left (the old copy moved
    aside, the new one not renamed) used to stay on disk for good, two copies of the step."""
    save_step6_again_killed_at(tmp_path, monkeypatch, killed_at)
    folder = tmp_path / "checkpoints"
    (folder / "step7.partial").mkdir()  # and a later step killed while DeepSpeed wrote it
    checkpoint.save(FakeEngine(b"eight"), tmp_path, "step8", {}, rank=0)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step6", "step8"]
    assert content(folder / "step6") == (b"old" if killed_at == "step6" else b"new")
    checkpoint.verify(folder / "step6")
    assert checkpoint.resolve("latest", tmp_path) == (folder, "step8")


def test_a_bilevel_resume_keeps_its_split_and_a_one_level_one_has_none():
    """The D1/D2 split decides which examples each level's steps read: part of a bi-level run's facts
    (a resume with another split_ratio is refused), not of LoRA's, which has no split."""
    from ds_bilevel.config import config_from_flat

    def facts(**settings):
        return checkpoint.run_facts(config_from_flat(settings), {"zero_optimization": {"stage": 2}}, 1)

    assert "split_ratio" not in facts(**{"adapter.method": "lora"})
    saved = facts(**{"adapter.method": "bidora"})
    resumed = facts(**{"adapter.method": "bidora", "bilevel.split_ratio": 0.5})
    assert saved["split_ratio"] == 0.8 and saved["global_batch_size"] == 16 and saved["dataset"] == "builtin:instruct"
    assert {k for k in saved if saved[k] != resumed[k]} == {"split_ratio"}


def test_check_fits_names_every_changed_fact(tmp_path):
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({"files": {}, "run": {
        "split_ratio": 0.8, "global_batch_size": 16, "data": {"max_length": 64, "train_size": 2048}}}))
    with pytest.raises(ValueError) as error:
        checkpoint.check_fits(tmp_path, {"split_ratio": 0.5, "global_batch_size": 8,
                                         "data": {"max_length": 64, "train_size": 100}})
    line = str(error.value)
    assert "bilevel.split_ratio 0.8 (this run: 0.5)" in line and "data.train_size 2048 (this run: 100)" in line
    assert "global batch size (micro_batch_size x gradient_accumulation_steps x world size) 16 (this run: 8)" in line
    assert "max_length" not in line and "\n" not in line
