"""Two "nodes" on this machine: two deepspeed launchers with a hostfile, --no_ssh and --node_rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from launch_helpers import REPO, free_port, launch, write_ds_config
from safetensors.torch import load_file

pytestmark = pytest.mark.launcher

ARGS = ["--method", "bidora", "--hypergrad", "darts", "--max_steps", "4", "--model_name_or_path",
        "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8", "--micro_batch_size", "2"]


def test_two_node_run_matches_single_node(tmp_path):
    config = write_ds_config(tmp_path, 3, bf16=False)
    single = tmp_path / "single"
    result = launch(["--ds_config", str(config), *ARGS, "--output_dir", str(single)])
    assert result.returncode == 0, result.stderr[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    multi, port = tmp_path / "multi", free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(REPO / "launch" / "train.py"), "--ds_config", str(config), *ARGS, "--output_dir", str(multi)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "world_size\": 2" in outputs[0]

    expected, got = load_file(single / "adapter_model.safetensors"), load_file(multi / "adapter_model.safetensors")
    a = torch.cat([expected[k].flatten() for k in expected])
    b = torch.cat([got[k].flatten() for k in expected])
    assert ((a - b).norm() / a.norm()).item() < 1e-6  # same world size: only the transport differs
