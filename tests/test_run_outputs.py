"""What a run leaves for a person: the progress bar, metrics.jsonl, TensorBoard events, the PNG plot."""

from __future__ import annotations

import json

import pytest
from launch_helpers import FAST_ARGS, REPO, launch, run_script

pytestmark = pytest.mark.launcher


def test_progress_metrics_tensorboard_and_plot(tmp_path):
    config = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    config["tensorboard"]["enabled"] = True  # output_path "auto": <output_dir>/monitor
    config_file = tmp_path / "tb.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "run"
    result = launch(["--ds_config", str(config_file), "--method", "bidora", "--max_steps", "12",
                     "--output_dir", str(out), "--log_steps", "2", "--eval_steps", "6", *FAST_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train bidora: 100%" in result.stderr and "12/12" in result.stderr  # tqdm on rank 0 only
    assert result.stderr.count("train bidora:   0%") == 1

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 6, 12]
    assert all(r["outer_loss"] is not None for r in rows if "train_loss" in r)  # both levels logged

    png = out / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = [p.parent for p in (out / "monitor").rglob("events.out.tfevents*")]
    assert event_dirs
    accumulator = EventAccumulator(str(event_dirs[0]))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"ds_bilevel/train_loss", "ds_bilevel/outer_loss", "ds_bilevel/eval_exact_match"} <= set(scalars)
    logged = [e.value for e in accumulator.Scalars("ds_bilevel/train_loss")]
    assert logged == pytest.approx([r["train_loss"] for r in rows if "train_loss" in r])


@pytest.mark.launcher
def test_a_finished_run_frees_its_engine_and_model(tmp_path):
    """launch/train.py's main() run three times in one process, and PEFT's worker once (as
    bench/gpu_worker.py does): after each, no DeepSpeed engine or model is left once the garbage
    collector has run, at ZeRO-2 and 3, one-level, bi-level and Bi-LoRA. Without BilevelEngine.close
    the engine and its model outlive the run (DeepSpeed's gradient hooks hold them from C++): on a
    GPU, a model's weights per run."""
    run_script("engine_release.py", tmp_path, 1)
    results = json.loads((tmp_path / "release.json").read_text())
    # ZeRO-3's forward stack holds the model's root alone after 2 darts cycles with checkpointing (it
    # held 65: the modules each recomputation entered and never left, 32 more per cycle)
    assert results["bidora-darts-zero3"].pop("stacked_at_close") == 1, results
    for name in ("lora-zero2", "bidora-darts-zero3", "bilora_sam-zero2"):
        assert results[name] == {"exit": 0, "engines": 0, "models": 0}, (name, results[name])
    assert results["peft-lora-zero3"] == {"exit": None, "engines": 0, "models": 0}, results  # the PEFT peer too
    assert results["lora-zero2-without-close"] == {"exit": 0, "engines": 1, "models": 1}, results
