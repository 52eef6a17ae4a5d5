"""Interrupted saves, non-finite steps and damaged files, through the real launcher on 2 CPU ranks.

Faults are injected by tests/scripts/fault_injection.py (a wrapper of launch/train.py)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import REPO, launch, run_summary, write_ds_config
from safetensors.torch import load_file

pytestmark = pytest.mark.launcher

FAULTY = REPO / "tests" / "scripts" / "fault_injection.py"
SMALL = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8",
         "--micro_batch_size", "2", "--learning_rate", "1e-2", "--log_steps", "1", "--eval_steps", "0"]
RESUMABLE = [*SMALL, "--method", "bidora", "--hypergrad", "darts", "--max_steps", "6", "--save_steps", "2"]


def adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(ds config, run folder) of a run that saved at steps 2, 4 and 6 (its end) and was never stopped."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = write_ds_config(folder, 2, bf16=False)
    result = launch(["--ds_config", str(config), *RESUMABLE, "--output_dir", str(folder / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    return config, folder / "run"


# ZeRO-2 on 2 ranks: rank 0 writes the model states then its optimizer partition (files 1, 2 at
# step 2, file 3 at step 4); rank 1 writes its optimizer partition only (file 2 is at step 4).
@pytest.mark.parametrize(("rank", "call"), [(0, 3), (1, 2)])
def test_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted, rank, call):
    config, reference = uninterrupted
    out = tmp_path / "run"
    common = ["--ds_config", str(config), *RESUMABLE, "--output_dir", str(out)]
    crashed = launch(common, script=FAULTY, FAULT=f"kill_in_save:{rank}:{call}")
    assert crashed.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step2"
    assert (checkpoints / "step4.partial").is_dir() and not (checkpoints / "step4").exists()

    resumed = launch([*common, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = adapters(reference), adapters(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not (checkpoints / "step4.partial").exists() and (checkpoints / "step4").is_dir()
    assert (checkpoints / "latest").read_text() == "step6"  # the step that ends the run is saved too


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    result = launch(["--method", "lora", *SMALL, "--max_steps", "8", "--max_nonfinite_steps", "3",
                     "--output_dir", str(out)], script=FAULTY, FAULT="nan_loss:2,3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_summary(out)["nonfinite_steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = {row["step"]: row["nonfinite_steps"] for row in rows if "train_loss" in row}
    assert counts == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2}
    assert math.isnan(next(row["train_loss"] for row in rows if row.get("step") == 3))
    assert all(torch.isfinite(t).all() for t in adapters(out).values())


def finite_everywhere(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(finite_everywhere(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite_everywhere(v) for v in value)
    return True


def test_repeated_nonfinite_steps_stop_the_run_with_the_documented_error(tmp_path):
    out = tmp_path / "run"
    result = launch(["--method", "lora", *SMALL, "--max_steps", "8", "--max_nonfinite_steps", "3",
                     "--save_steps", "1", "--output_dir", str(out)], script=FAULTY, FAULT="nan_loss:2,3,4")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: 3 optimizer steps in a row had a non-finite loss or gradient")
    checkpoints = sorted((out / "checkpoints").glob("step*"))
    assert [c.name for c in checkpoints] == ["step1", "step2", "step3", "step4"]
    for path in (out / "checkpoints").rglob("*.pt"):
        assert finite_everywhere(torch.load(path, map_location="cpu", weights_only=False)), path


def refused_resume(out: Path, config: Path) -> subprocess.CompletedProcess:
    """Resume check before any process starts: python launch/train.py, no launcher."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", str(config),
                           *RESUMABLE, "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", ["truncated", "no manifest"])
def test_damaged_checkpoint_is_refused_before_launch(tmp_path, uninterrupted, damage):
    config, reference = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step6"  # what "latest" names: the run's last step
    if damage == "truncated":
        victim = sorted(newest.glob("*optim_states.pt"))[0]
        victim.write_bytes(victim.read_bytes()[:1000])
        expected = f"error: resume_from_checkpoint: {victim} is truncated or missing (1000 bytes, expected"
    else:
        (newest / "ds_bilevel_manifest.json").unlink()
        expected = f"error: resume_from_checkpoint: {newest} is incomplete"
    before = sorted(p.name for p in out.rglob("*"))
    result = refused_resume(out, config)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written
