"""The real `deepspeed` launcher on 2 CPU ranks: the training entry point end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from launch_helpers import FAST_ARGS, REPO, launch, run_summary, write_ds_config
from safetensors.torch import load_file

from ds_bilevel.adapters import AdapterConfig, inject_adapters
from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.models import load_tokenizer
from ds_bilevel.outputs import base_checksum

pytestmark = pytest.mark.launcher


def reference_base_checksum(method: str, dtype: torch.dtype) -> str:
    """The checksum of the untouched base, as DeepSpeed holds it (cast to the run's dtype)."""
    model = build_builtin_model("builtin:micro-llama", len(load_tokenizer("builtin:micro-llama")), seed=0)
    inject_adapters(model.to(dtype), AdapterConfig(method=method))
    return base_checksum(model)


@pytest.mark.parametrize(("method", "bf16"), [("lora", False), ("dora", True)])
def test_two_rank_training_lowers_loss_and_keeps_base(tmp_path, method, bf16):
    """The shipped CPU config (fp32) with LoRA, and DoRA with a bf16 base and fp32 masters."""
    import glob

    out = tmp_path / "run"
    shm_before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    config = write_ds_config(tmp_path, 2, bf16=True) if bf16 else "ds_configs/cpu_zero2.json"
    result = launch(["--ds_config", str(config), "--method", method, "--max_steps", "25",
                     "--output_dir", str(out), *FAST_ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = run_summary(out)
    assert summary["world_size"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.3
    # Only adapters moved: the base after training is bit-identical to a fresh one.
    assert summary["base_sha256"] == reference_base_checksum(method, torch.bfloat16 if bf16 else torch.float32)
    adapters = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapters.values())  # fp32 masters are saved
    lora_b = [t for name, t in adapters.items() if name.endswith("lora_B")]
    assert len(lora_b) == 2 * 7 and all(t.abs().sum() > 0 for t in lora_b)  # B left zero-init
    assert "== ds_bilevel run summary ==" in result.stdout
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before  # released at exit
    assert (out / "metrics.jsonl").read_text().count("train_loss") >= 2


def test_every_zero_stage_reaches_the_same_adapters(tmp_path):
    """fp32 DoRA on 2 ranks at ZeRO 0/1/2/3: same data order, same maths, same weights."""
    finals = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path / f"stage{stage}"
        config = write_ds_config(tmp_path, stage, bf16=False)
        result = launch(["--ds_config", str(config), "--method", "dora", "--max_steps", "6",
                         "--output_dir", str(out), "--gradient_accumulation_steps", "2", *FAST_ARGS,
                         "--learning_rate", "5e-3"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert run_summary(out)["base_sha256"] == reference_base_checksum("dora", torch.float32)
        finals[stage] = load_file(out / "adapter_model.safetensors")
    reference = torch.cat([t.flatten() for t in finals[0].values()])
    for stage in (1, 2, 3):
        # Relative to the whole adapter state: Adam's g / (|g| + eps) turns float rounding in a
        # near-zero gradient entry into a visible step for that one entry (seen: 6e-6 on one
        # element of a 0.02-scale lora_B at stage 3), so an elementwise bound would measure noise.
        final = torch.cat([finals[stage][name].flatten() for name in finals[0]])
        error = ((final - reference).norm() / reference.norm()).item()
        assert error < 1e-5, (stage, error)
    assert all(t.abs().max() > 0 for name, t in finals[0].items() if name.endswith("lora_B"))


def test_bad_setting_exits_2_before_any_distributed_work(tmp_path):
    """A setting refused by its own check (RunConfig.validate) imports neither DeepSpeed nor
    transformers nor datasets (-X importtime lists every module the process imports)."""
    out = tmp_path / "untouched"
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "launch" / "train.py"), "--method", "qlora",
                             "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("import time:")]
    assert lines[-1].startswith("error: adapter.method: 'qlora' is not one of")
    assert not out.exists()
    modules = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
               if line.startswith("import time:")}
    assert not {"deepspeed", "transformers", "datasets", "accelerate"} & modules


def test_local_jsonl_instructions_and_csv_classification(tmp_path):
    """Own data through the real launcher: an instruction JSONL file and a classification CSV."""
    import json

    from ds_bilevel.builtin.task import make_split

    jsonl = tmp_path / "instructions.jsonl"
    jsonl.write_text("\n".join(json.dumps({"instruction": e["prompt"], "answer": e["response"]})
                               for e in make_split(seed=3, size=300)))
    csv = tmp_path / "parity.csv"
    csv.write_text("sentence,label\n" + "\n".join(f"the number {n},{n % 2}" for n in range(10, 310)))
    runs = {
        "jsonl": ["--dataset", str(jsonl), "--data.prompt_field", "instruction", "--data.response_field", "answer"],
        "csv": ["--dataset", str(csv), "--data.format", "classification", "--data.text_field", "sentence",
                "--data.label_names", "even,odd", "--method", "bidora", "--hypergrad", "first_order"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        result = launch(["--ds_config", "ds_configs/cpu_zero2.json", "--max_steps", "30", "--output_dir", str(out),
                         *FAST_ARGS, "--data.eval_size", "40", *args])
        assert result.returncode == 0, result.stderr[-3000:]
        summary = run_summary(out)
        assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.4, name
    # the classification answers are the label words: after training the model says one of them
    assert (tmp_path / "csv" / "split.json").is_file()
