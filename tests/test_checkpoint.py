"""Exact resume through DeepSpeed checkpoints, on 2 CPU ranks in fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch_helpers import launch, run_summary, write_ds_config
from safetensors.torch import load_file

from ds_bilevel.checkpoint import resolve

pytestmark = pytest.mark.launcher

SMALL = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8",
         "--micro_batch_size", "2", "--max_steps", "6", "--learning_rate", "1e-2", "--log_steps", "1"]


@pytest.mark.parametrize(("stage", "method", "extra", "save_steps"), [
    (2, "bidora", ["--hypergrad", "darts", "--gradient_accumulation_steps", "2"], 3),
    (3, "bilora_sam", [], 3),
    # 6 bi-level steps then 3 of retraining; the checkpoint at 8 lies inside the retraining phase
    (2, "bidora", ["--hypergrad", "first_order", "--bilevel.retrain_steps", "3"], 4),
])
def test_resumed_run_ends_bit_identical(tmp_path, stage, method, extra, save_steps):
    config = write_ds_config(tmp_path, stage, bf16=False)
    common = ["--ds_config", str(config), "--method", method, *SMALL, *extra]
    full = tmp_path / "full"
    result = launch([*common, "--output_dir", str(full), "--save_steps", str(save_steps)])
    assert result.returncode == 0, result.stderr[-3000:]
    total = run_summary(full)["steps"]
    last = save_steps * ((total - 1) // save_steps)  # none at the last step
    assert (full / "checkpoints" / "latest").read_text().strip() == f"step{last}"

    # A second run folder holding only the step-3 checkpoint, resumed with "latest".
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", resumed / "checkpoints")
    assert resolve("latest", resumed) == (resumed / "checkpoints", f"step{last}")
    result = launch([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # the resumed run trained only the steps after the checkpoint and kept the first run's starting numbers
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(last + 1, total + 1))
    assert run_summary(resumed)["eval_loss_before"] == run_summary(full)["eval_loss_before"]


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path):
    import subprocess
    import sys

    from launch_helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--resume_from_checkpoint",
                             str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: resume_from_checkpoint:")
