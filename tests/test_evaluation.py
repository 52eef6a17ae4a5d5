"""Evaluation scores the model the user gets: Bi-LoRA's auxiliary (ascent) module, which the
export drops, is left out of every evaluation forward (issue 12, item 2)."""

from __future__ import annotations

import pytest
import torch
from launch_helpers import launch, run_summary, write_ds_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ds_bilevel.adapters.bilora_sam import auxiliary_layers
from ds_bilevel.config import config_from_flat
from ds_bilevel.evaluation import inference_forward, local_totals, metrics_from_totals, rank_shard
from ds_bilevel.export import export
from ds_bilevel.preparation import prepare

SAM = {"model_name_or_path": "builtin:micro-llama", "adapter.method": "bilora_sam", "data.train_size": 64,
       "data.eval_size": 16, "micro_batch_size": 2, "max_steps": 6, "learning_rate": 1e-2, "adapter.rho": 0.5,
       "log_steps": 1, "eval_steps": 0}


def eval_loss(model: torch.nn.Module, data) -> float:
    """The evaluation's loss of ``model`` as its forward stands, one process."""
    totals = local_totals(model.eval(), data.eval_set, data.tokenizer.pad_token_id,
                          rank_shard(len(data.eval_set), 0, 1, 8))
    return metrics_from_totals(totals, classes=False)["eval_loss"]


def test_inference_forward_leaves_the_auxiliary_module_out_and_restores_it():
    data = prepare(config_from_flat(SAM))
    model = data.model
    with torch.no_grad():  # a nonzero auxiliary module, as training leaves it
        gen = torch.Generator().manual_seed(3)
        for layer in auxiliary_layers(model):
            layer.aux_B.copy_(0.3 * torch.randn(layer.aux_B.shape, generator=gen))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
    with_auxiliary = eval_loss(model, data)
    with inference_forward(model):
        evaluated = eval_loss(model, data)
    assert all(layer.auxiliary_enabled for layer in auxiliary_layers(model))  # restored
    assert eval_loss(model, data) == with_auxiliary
    with torch.no_grad():
        for layer in auxiliary_layers(model):
            layer.aux_B.zero_()
    without_auxiliary = eval_loss(model, data)
    assert evaluated == without_auxiliary  # exactly: the term is left out, not approximated
    assert abs(with_auxiliary - without_auxiliary) > 1e-3 * without_auxiliary


@pytest.mark.launcher
def test_bilora_sam_run_reports_the_exported_models_eval_loss(tmp_path):
    """2 ranks at ZeRO-3 (fp32): the summary's final eval loss is the merged export's, not the
    loss of the training forward with the auxiliary module added."""
    config = write_ds_config(tmp_path, 3, bf16=False)
    out = tmp_path / "run"
    args = [f"--{key}={value}" for key, value in SAM.items()]
    result = launch(["--ds_config", str(config), *args, "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    reported = run_summary(out)["eval_loss_after"]

    data = prepare(config_from_flat({**SAM, "output_dir": str(out)}))
    merged = AutoModelForCausalLM.from_pretrained(export(out, tmp_path / "merged", "merged", dtype="float32"))
    exported = eval_loss(merged, data)
    saved = load_file(out / "adapter_model.safetensors")
    missing = set(saved) - set(data.model.state_dict())
    assert not missing, missing
    data.model.load_state_dict(saved, strict=False)
    with_auxiliary = eval_loss(data.model, data)

    assert abs(reported - exported) <= 1e-5 * exported, (reported, exported)
    assert abs(with_auxiliary - exported) > 1e-3 * exported, (with_auxiliary, exported)
