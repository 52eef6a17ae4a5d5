"""Other ways to start a run: two "nodes" on this machine (two deepspeed launchers with a hostfile,
--no_ssh and --node_rank), and accelerate launch with its DeepSpeed plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from launch_helpers import REPO, cpu_env, free_port, launch, run_summary, start_documented_loopback, write_ds_config
from safetensors.torch import load_file

from ds_bilevel.config import load_config
from ds_bilevel.reference import run_reference

pytestmark = pytest.mark.launcher

ARGS = ["--method", "bidora", "--hypergrad", "darts", "--max_steps", "4", "--model_name_or_path",
        "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8", "--micro_batch_size", "2",
        "--gradient_accumulation_steps", "1"]


def test_two_node_darts_at_zero3_matches_one_rank(tmp_path):
    """Two "nodes" (one launcher each, loopback: docs/cluster.md's recipe) of BiDoRA darts at ZeRO-3
    with DeepSpeed's default persistence threshold and accumulation 1 (issue 12's configuration)
    end where one rank ends with the same global batch, and far from first_order, which a lost
    second-order term gives."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "bf16": {"enabled": False},
                                  "zero_optimization": {"stage": 3}}))
    single = tmp_path / "single"
    result = launch(["--ds_config", str(config), *ARGS, "--micro_batch_size", "4", "--output_dir", str(single)],
                    num_ranks=1)
    assert result.returncode == 0, result.stderr[-3000:]

    multi = tmp_path / "multi"  # docs/cluster.md's loopback recipe, with these training flags
    nodes = start_documented_loopback(tmp_path, ["--ds_config", str(config), *ARGS, "--output_dir", str(multi)])
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert run_summary(multi)["world_size"] == 2 and "== ds_bilevel run summary ==" in outputs[0]  # node 0 prints it

    expected, got = load_file(single / "adapter_model.safetensors"), load_file(multi / "adapter_model.safetensors")
    first_order = run_reference(load_config([*ARGS, "--micro_batch_size", "4", "--hypergrad", "first_order"]), 4)
    error, gap = rel_diff(got, expected), rel_diff(first_order, expected)
    assert error < 1e-5 and gap > 100 * 1e-5, (error, gap)


def rel_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    a = torch.cat([expected[k].flatten() for k in expected])
    return ((torch.cat([got[k].flatten() for k in expected]) - a).norm() / a.norm()).item()


def test_accelerate_launch_with_its_deepspeed_plugin(tmp_path):
    """`accelerate launch --use_deepspeed` starts the same 2-rank run as the deepspeed launcher."""
    config = write_ds_config(tmp_path, 2, bf16=False)
    reference = tmp_path / "deepspeed"
    result = launch(["--ds_config", str(config), *ARGS, "--output_dir", str(reference)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "accelerate"
    env = cpu_env()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--deepspeed_config_file", str(config),
               str(REPO / "launch" / "train.py"), "--ds_config", str(config), *ARGS, "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_summary(out)["world_size"] == 2
    expected, got = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-9) for k in expected)


def test_slurm_script_runs_two_nodes(tmp_path):
    """launch/slurm_train.sh with stand-ins for srun and scontrol that start both "nodes" here."""
    config = write_ds_config(tmp_path, 3, bf16=False)
    out = tmp_path / "slurm"
    env = cpu_env(FAKE_NODES="node-a node-b", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="7", GPUS_PER_NODE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), HOSTFILE=str(tmp_path / "hostfile"),
                  PATH=f"{REPO / 'tests' / 'scripts' / 'fake_slurm'}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sh"), "--ds_config", str(config), *ARGS,
                             "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 nodes x 1 ranks" in result.stdout
    assert (tmp_path / "hostfile").read_text() == "node-a slots=1\nnode-b slots=1\n"
    assert run_summary(out)["world_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
