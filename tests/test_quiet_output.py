"""What a newcomer sees (issue 18): a clean 2-rank run prints its progress and the summary, not
DeepSpeed's and torch's known noise once per rank; a refused launch prints its one line once."""

from __future__ import annotations

import pytest
from launch_helpers import FAST_ARGS, launch

pytestmark = pytest.mark.launcher

# Lines every clean launch printed before, each once per rank or once per run.
NOISE = [
    "You are using ZeRO with an untested optimizer",  # DeepSpeed's engine, rank 0
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # torch's FutureWarning, every rank
    "deepspeed_shm_comm_op built successfully",  # DeepSpeed's CPU shared-memory op, every rank
]


def test_a_clean_run_prints_progress_and_the_summary_once(tmp_path):
    out = tmp_path / "run"
    result = launch(["--ds_config", "ds_configs/cpu_zero2.json", "--method", "lora", "--max_steps", "4",
                     "--output_dir", str(out), *FAST_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in output, noise
    assert output.count("== ds_bilevel run summary ==") == 1
    assert output.count("adapters: lora on ") == 1
    # no raw JSON summary line any more: summary.json holds it
    lines = output.replace("\r", "\n").splitlines()
    assert not [line for line in lines if line.startswith("{")]
    assert (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()
    # progress bars on rank 0 only: the training bar and one tokenize bar per split (train, eval)
    assert output.count("train lora:   0%") == 1
    assert output.count("tokenize:   0%") <= 2


def test_a_refused_launch_prints_its_line_once(tmp_path):
    out = tmp_path / "untouched"
    result = launch(["--ds_config", "ds_configs/cpu_zero2.json", "--method", "lora", "--output_dir", str(out),
                     *FAST_ARGS, "--learning_rate", "-1"])  # the last value of a flag counts
    assert result.returncode == 2
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: learning_rate: -1.0 must be > 0"], output[-3000:]
    assert not out.exists()
