"""``python -m bench gpu``: the ratios and MFU it derives (no launch), and its CPU smoke run
(one launch of bench/gpu_worker.py running PEFT and ours in the same ranks, at ZeRO-2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu

REPO = Path(__file__).resolve().parents[1]


def test_derived_columns():
    options = gpu.options_for(["--out", "x", "--peak_tflops", "1000", "--model", "builtin:micro-llama", "--seq", "32"])
    rows = [
        {"group": "zero2", "name": "peft lora", "tokens_per_s": 1000.0, "s_per_step": 1.0, "wall_s": 5.0,
         "peak_memory_gb_per_rank": [2.0]},
        {"group": "zero2", "name": "lora", "tokens_per_s": 1200.0, "s_per_step": 0.8, "peak_memory_gb_per_rank": [1.9],
         "wall_s": 5.0},
        {"group": "zero2", "name": "bidora darts", "tokens_per_s": 300.0, "s_per_step": 3.2,
         "peak_memory_gb_per_rank": [2.09], "wall_s": 5.0},
        {"group": "zero2", "name": "dora", "tokens_per_s": 1100.0, "s_per_step": 0.9, "wall_s": 5.0,
         "peak_memory_gb_per_rank": [1.9]},
        {"group": "zero2", "name": "dora undetached", "tokens_per_s": 1000.0, "s_per_step": 1.0, "wall_s": 5.0,
         "peak_memory_gb_per_rank": [1.9]},
        {"group": "zero2", "name": "bilora_sam", "tokens_per_s": 1000.0, "s_per_step": 1.0, "wall_s": 5.0,
         "peak_memory_gb_per_rank": [1.9]},
        {"group": "zero3", "name": "bidora darts", "tokens_per_s": 300.0, "s_per_step": 3.2, "wall_s": 5.0,
         "peak_memory_gb_per_rank": [2.0]},
        {"group": "zero3", "name": "lora", "error": "RuntimeError: boom"},
    ]
    gpu.derive(rows, options, ranks=1)
    lora, darts, dora, undetached, sam, darts3 = rows[1:7]
    assert lora["speed_vs_peft"] == pytest.approx(1.2) and lora["memory_vs_peft"] == pytest.approx(0.95)
    assert darts["time_vs_lora"] == pytest.approx(4.0) and darts["memory_vs_lora"] == pytest.approx(1.1)
    assert darts["passes_per_inner_step"] == 4.0 and "speed_vs_peft" not in darts
    # time / (passes x sibling): BiDoRA darts against 4 DoRA passes (0.9 s) and 4 undetached ones (1.0 s),
    # Bi-LoRA against one LoRA pass; none for the one-level rows, none where the sibling did not run
    assert darts["time_vs_passes_x_sibling"] == pytest.approx({"dora": 3.2 / 3.6, "dora undetached": 0.8})
    assert sam["time_vs_passes_x_sibling"] == pytest.approx({"lora": 1.25})
    assert lora["time_vs_passes_x_sibling"] == dora["time_vs_passes_x_sibling"] == {}
    assert undetached["time_vs_passes_x_sibling"] == {} and darts3["time_vs_passes_x_sibling"] == {}
    per_token = gpu.flops_per_token("builtin:micro-llama", 32)
    assert lora["useful_mfu"] == pytest.approx(1200.0 * per_token / 1e15)
    text = gpu.markdown(rows, [{"group": "zero2", "wall_s": 10.0, "configs": 3}])
    assert "| zero3 | lora | RuntimeError: boom |" in text and "| zero2 | lora | 1200 | 1.90 |" in text
    assert "| 4.00 | 0.89 (dora), 0.80 (dora undetached) | 1.10 |" in text
    main_table = text.split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in main_table}) == 1, main_table  # the error row fills every column


def test_siblings_run_before_the_rows_compared_with_them(tmp_path):
    """A launch cut by the budget skips the last configurations: each row's siblings come before it,
    and the undetached DoRA row carries the flag that makes its pass BiDoRA's."""
    names = list(gpu.CONFIGS)
    for position, (name, (_, method, _, _)) in enumerate(gpu.CONFIGS.items()):
        assert all(names.index(sibling) < position for sibling in gpu.siblings(method)), name
    assert gpu.siblings("bidora") == ["dora", "dora undetached"] and gpu.siblings("bilora_sam") == ["lora"]
    options = gpu.options_for(["--out", str(tmp_path), "--stages", "3", "--big_model", ""])
    (plan,) = gpu.plans(options, tmp_path / "data.jsonl", tmp_path, deadline=0.0)
    argv = {config["name"]: config["argv"] for config in plan["configs"]}
    assert argv["dora undetached"][-4:] == ["--method", "dora", "--adapter.detach_norm", "false"]
    assert "--adapter.detach_norm" not in argv["dora"] and "--adapter.detach_norm" not in argv["bidora darts"]


def test_8b_rows_close_zero2_and_compare_with_the_first(tmp_path):
    """The 8B shape runs at the end of the ZeRO-2 launch only: with the logits, then the loss inside the
    head without and with recomputation (the MFU target's candidate comes second, so a budget cut
    keeps it); each variant's time and memory are read against the 8B logits row, at the 8B FLOPs."""
    options = gpu.options_for(["--out", str(tmp_path), "--configs", "lora"])
    zero2, zero3 = gpu.plans(options, tmp_path / "data.jsonl", tmp_path, deadline=0.0)
    names = [config["name"] for config in zero2["configs"]]
    assert names == ["lora", "lora 8b-shape", "lora 8b-shape linear_cross_entropy no checkpointing",
                     "lora 8b-shape linear_cross_entropy"]
    assert [config["name"] for config in zero3["configs"]] == ["lora"]
    argv = {config["name"]: config["argv"] for config in zero2["configs"]}
    no_ckpt = argv["lora 8b-shape linear_cross_entropy no checkpointing"]
    assert no_ckpt[no_ckpt.index("--gradient_checkpointing") + 1] == "false"
    assert no_ckpt[no_ckpt.index("--model_name_or_path") + 1] == "builtin:llama-3-8b-shape"
    assert "--gradient_checkpointing" not in argv["lora 8b-shape linear_cross_entropy"]
    assert len({a[a.index("--output_dir") + 1] for a in argv.values()}) == 4  # a run folder each
    rows = [{"group": "zero2", "name": name, "tokens_per_s": tps, "s_per_step": 8192 / tps, "wall_s": 9.0,
             "peak_memory_gb_per_rank": [gb]}
            for name, tps, gb in [("lora", 20000.0, 5.0), ("lora 8b-shape", 7500.0, 35.0),
                                  ("lora 8b-shape linear_cross_entropy no checkpointing", 10000.0, 70.0)]]
    gpu.derive(rows, options, ranks=1)
    mid, big, no_ckpt_row = rows
    assert no_ckpt_row["time_vs_lora"] == pytest.approx(0.75) and no_ckpt_row["memory_vs_lora"] == pytest.approx(2.0)
    assert "time_vs_lora" not in big and "time_vs_lora" not in mid
    per_token = gpu.flops_per_token("builtin:llama-3-8b-shape", 2048)
    assert no_ckpt_row["useful_mfu"] == pytest.approx(10000.0 * per_token / (gpu.H100_PEAK_TFLOPS * 1e12))


def test_unknown_config_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu.options_for(["--out", "x", "--configs", "lora,qlora"])
    assert stop.value.code == 2 and "--configs: unknown ['qlora']" in capsys.readouterr().err


@pytest.mark.launcher
def test_smoke_runs_peft_and_ours_in_one_launch(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "gpu", "--out", str(tmp_path), "--smoke", "--stages", "2",
                             "--configs", "peft lora,lora,dora undetached", "--big_model", ""],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert len(results["launches"]) == 1 and results["launches"][0]["configs"] == 3
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == {"peft lora", "lora", "dora undetached"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_gb"] > 0 and row["timed_steps"] == 1, row
    assert rows["lora"]["speed_vs_peft"] > 0 and rows["lora"]["outside_training_s"] > 0
    assert "| zero2 | lora |" in (tmp_path / "gpu.md").read_text()
    # the undetached row trained DoRA with its norm in the graph (what BiDoRA's pass computes)
    config = json.loads((tmp_path / "runs" / "zero2_dora_undetached" / "run_config.json").read_text())
    assert config["adapter"]["method"] == "dora" and config["adapter"]["detach_norm"] is False


@pytest.mark.launcher
def test_gpu_session_script_leaves_every_result_and_no_run_folder(tmp_path):
    """bench/gpu_session.sh, the one device call of a GPU session, on CPU (SMOKE=1): the layer
    benchmark with its op counts and bench gpu's tables come back; the run folders do not."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu_session.sh", str(out), "--stages", "2", "--configs", "lora",
                             "--big_model", ""], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SMOKE": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    layers = {row["method"]: row for row in json.loads((out / "adapter_layer.json").read_text())["rows"]}
    assert set(layers) == {"lora", "dora", "bilora_sam"}
    # the fused node issues fewer ops than the plain autograd form (adapters/fused.py)
    assert all(row["ops"]["fused"]["ops"] < row["ops"]["plain"]["ops"] for row in layers.values()), layers
    rows = json.loads((out / "gpu.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["lora"] and rows[0]["tokens_per_s"] > 0
    assert "| zero2 | lora |" in (out / "gpu.md").read_text() and (out / "versions.txt").read_text().strip()
    assert not (out / "runs").exists() and not list(out.glob("*.jsonl"))
