"""Exact resume through DeepSpeed checkpoints, on 2 CPU ranks in fp32."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from launch_helpers import launch, run_script, run_summary, train_in_one_process, write_ds_config
from safetensors.torch import load_file

from ds_bilevel.checkpoint import resolve

pytestmark = pytest.mark.launcher

SMALL = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8",
         "--micro_batch_size", "2", "--max_steps", "6", "--learning_rate", "1e-2", "--log_steps", "1"]


@pytest.mark.parametrize(("stage", "method", "extra", "save_steps"), [
    (2, "bidora", ["--hypergrad", "darts", "--gradient_accumulation_steps", "2"], 3),
    # dropout draws from each rank's own generator as many numbers as its batches hold, which differ in
    # length (VARIED): a resume must give every rank back its own state (rank 0's for all made this differ)
    (3, "bilora_sam", ["--adapter.dropout", "0.1", "--dataset", "VARIED"], 3),
    # 6 bi-level steps then 3 of retraining; the checkpoint at 8 lies inside the retraining phase
    (2, "bidora", ["--hypergrad", "first_order", "--bilevel.retrain_steps", "3"], 4),
])
def test_resumed_run_ends_bit_identical(tmp_path, stage, method, extra, save_steps):
    config = write_ds_config(tmp_path, stage, bf16=False)
    if "VARIED" in extra:  # prompts of 1 to 40 words: micro-batches of other lengths on each rank
        rng = random.Random(0)
        words = ["red", "blue", "green", "one", "two"]
        rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))),
                 "response": rng.choice(["yes", "no"])} for _ in range(80)]
        (tmp_path / "varied.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        extra = [str(tmp_path / "varied.jsonl") if arg == "VARIED" else arg for arg in extra]
    common = ["--ds_config", str(config), "--method", method, *SMALL, *extra]
    full = tmp_path / "full"
    result = launch([*common, "--output_dir", str(full), "--save_steps", str(save_steps)])
    assert result.returncode == 0, result.stderr[-3000:]
    total = run_summary(full)["steps"]
    last = save_steps * ((total - 1) // save_steps)  # the last checkpoint before the run's end
    assert (full / "checkpoints" / "latest").read_text().strip() == f"step{total}"  # the end is saved too

    # A second run folder holding the step-`last` checkpoint and the metrics.jsonl of a launch that
    # went on past it (to the end, then a line cut short by a kill), resumed with "latest".
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / f"step{last}", resumed / "checkpoints" / f"step{last}")
    (resumed / "checkpoints" / "latest").write_text(f"step{last}")
    (resumed / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text() + '{"step": ')
    assert resolve("latest", resumed) == (resumed / "checkpoints", f"step{last}")
    result = launch([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # the resumed run trained only the steps after the checkpoint and kept the first run's starting numbers
    assert run_summary(resumed)["steps_this_launch"] == total - last
    assert run_summary(resumed)["eval_loss_before"] == run_summary(full)["eval_loss_before"]
    # metrics.jsonl: the lines up to the checkpoint, then the resumed launch's, none twice (issue 18):
    # the lines of the run that never stopped, the same numbers but for the timings
    def lines(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]

    trained = [r["step"] for r in lines(resumed) if "train_loss" in r]
    assert trained == list(range(1, total + 1))
    assert lines(resumed) == lines(full)


def test_a_finished_run_is_saved_and_resumes_with_more_steps(tmp_path):
    """--save_steps 4 --max_steps 4 saves the step that ends the run; resumed with --max_steps 8 the
    run trains steps 5 to 8 from it, its learning rate decaying over the 8 steps (issue 12, item 3).
    One process: the schedule does not depend on the ranks (test_resumed_run_ends_bit_identical
    resumes on 2)."""
    out = tmp_path / "run"
    common = ["--method", "lora", "--model_name_or_path", "builtin:micro-llama", "--data.train_size", "32",
              "--data.eval_size", "8", "--micro_batch_size", "2", "--learning_rate", "1e-2", "--warmup_ratio", "0",
              "--log_steps", "1", "--eval_steps", "0", "--output_dir", str(out)]
    result = train_in_one_process([*common, "--max_steps", "4", "--save_steps", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step4"
    after_four = load_file(out / "adapter_model.safetensors")

    def timeless(path):  # metrics.jsonl's rows without their timings
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                for line in path.read_text().splitlines()]

    finished = timeless(out / "metrics.jsonl")
    # Resumed with nothing left, it trains nothing and evaluates again: the final row once, not twice.
    result = train_in_one_process([*common, "--max_steps", "4", "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_summary(out)["steps_this_launch"] == 0 and timeless(out / "metrics.jsonl") == finished
    assert [r["step"] for r in finished if "eval_loss" in r] == [0, 4]

    result = train_in_one_process([*common, "--max_steps", "8", "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in trained] == list(range(1, 9))  # steps 1-4, then 5-8 appended
    # linear decay over 8 steps from 1e-2: step k (1-based) ran at 1e-2 (1 - (k - 1) / 8), and logs the next one's
    assert [round(r["lr"], 8) for r in trained[4:]] == [round(1e-2 * (1 - k / 8), 8) for k in range(5, 9)]
    after_eight = load_file(out / "adapter_model.safetensors")
    moved = sum((after_eight[n] - after_four[n]).norm() ** 2 for n in after_four) ** 0.5
    assert moved > 1e-3 * sum(t.norm() ** 2 for t in after_four.values()) ** 0.5
    assert run_summary(out)["steps"] == 8 and run_summary(out)["steps_this_launch"] == 4  # issue 18: "8 in Ts"
    assert "(4 steps in " in result.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step4"  # no save_steps this time: none written


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path):
    import subprocess
    import sys

    from launch_helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--resume_from_checkpoint",
                             str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: resume_from_checkpoint:")


def test_every_rank_resumes_with_its_own_rng_state(tmp_path):
    """DeepSpeed writes the client state from rank 0 only: each rank's generator state is a file of
    its own in the checkpoint (and in its manifest), and a resume gives each rank its own back, not
    rank 0's (before, rank 1 took rank 0's: the dropout masks of a resumed GPU run differed)."""
    run_script("rank_rng_resume.py", tmp_path / "rng.json", 2)
    result = json.loads((tmp_path / "rng.json").read_text())
    assert result["restored"] == [True, True], result
    assert {"rng_state_0.pt", "rng_state_1.pt", "ds_bilevel_manifest.json"} <= set(result["files"]), result
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step1" / "ds_bilevel_manifest.json").read_text())
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(manifest["files"])
    assert not [name for name in result["checkpoints"] if name.endswith((".partial", ".replaced"))], result
