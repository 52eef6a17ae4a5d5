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


# ---- SIGTERM (a scheduler's time limit) and the launcher stopped alone (issue 17 item 4) ------------
def start_job(out: Path) -> tuple[subprocess.Popen, float]:
    """A long 2-rank LoRA run in its own session; returns once it has logged step 3."""
    import os
    import time

    from launch_helpers import cpu_env, free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(REPO / "launch" / "train.py"), "--method", "lora", *SMALL, "--max_steps", "500",
               "--output_dir", str(out)]
    job = subprocess.Popen(command, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if any(row.get("step", 0) >= 3 and "train_loss" in row for row in rows):
            return job, time.time()
        assert job.poll() is None, job.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(job.pid, 9)
    raise AssertionError("the job did not reach step 3")


@pytest.mark.parametrize("target", ["every process", "the runner alone"])
def test_sigterm_saves_the_current_step_and_says_where_to_resume(tmp_path, target):
    """SIGTERM to every process of the job, or to the deepspeed runner alone (whose ranks must not
    run on as orphans): every rank saves the step it reached and stops; one line says where to resume."""
    import os
    import signal
    import time

    from ds_bilevel.checkpoint import verify

    out = tmp_path / "run"
    job, _ = start_job(out)
    sent = time.time()
    if target == "every process":
        os.killpg(job.pid, signal.SIGTERM)
    else:
        job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)  # EOF: every rank has exited (they hold the pipes)
    stopped_after = time.time() - sent
    assert stopped_after < 30, stopped_after  # DeepSpeed's launch.py SIGKILLs after 30 s
    step = (out / "checkpoints" / "latest").read_text()
    verify(out / "checkpoints" / step)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    reason = "SIGTERM" if target == "every process" else "the deepspeed launcher ended"
    assert lines == [f"error: stopped by {reason} at {step.replace('step', 'step ')}: saved "
                     f"{out / 'checkpoints' / step}; resume with --resume_from_checkpoint latest"], stderr[-3000:]
    print(f"{target}: stopped {stopped_after:.1f} s after SIGTERM at {step}")


def test_a_full_disk_is_named(tmp_path):
    """torch.save's "unexpected pos" on a full disk becomes one line saying so and where."""
    from ds_bilevel.checkpoint import DiskFull, disk_full_named

    expected = r"no space left on device while saving checkpoint .*step4.partial \(\d+ MiB free there now\); free"
    with pytest.raises(DiskFull, match=expected), disk_full_named(tmp_path / "step4.partial"):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed, unexpected pos 64 vs 0")
    with pytest.raises(KeyError), disk_full_named(tmp_path):
        raise KeyError("other errors pass through")
