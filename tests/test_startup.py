"""Start-up (issue 13 item 2): the builtin weights are the seeded values whatever the build path,
and a run records where its launch spent its time, also when started without a launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from ds_bilevel.builtin.model import build_builtin_model, builtin_llama_config

REPO = Path(__file__).resolve().parents[1]
PHASES = ["before_main", "validation", "init_distributed", "tokenizer_and_data", "model_and_adapters",
          "deepspeed_initialize", "setup_rest", "eval_before", "first_step"]


def test_builtin_weights_are_the_seeded_draws_in_every_dtype():
    """No transformers init, no construction-order draws: each weight is N(0, std) from a generator
    seeded by (seed, name), norms are ones; bf16 holds the fp32 draw rounded."""
    seed, vocab = 5, 96
    std = builtin_llama_config("builtin:micro-llama", vocab).initializer_range
    fp32 = dict(build_builtin_model("builtin:micro-llama", vocab, seed=seed).named_parameters())
    bf16 = dict(build_builtin_model("builtin:micro-llama", vocab, seed=seed, dtype=torch.bfloat16).named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        expected = torch.randn(fp32[name].shape, generator=generator) * std
        assert torch.equal(fp32[name].detach(), expected), name
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name].detach(), expected.bfloat16()), name
    assert torch.equal(fp32["model.norm.weight"].detach(), torch.ones(fp32["model.norm.weight"].shape))


def test_a_run_without_launcher_records_its_phases(tmp_path):
    """`python launch/train.py` with no launcher environment runs as one rank (a free port, no
    mpi4py) and summary.json's phases add up to the time to its first step."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                            "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    started = time.time()
    result = subprocess.run([sys.executable, "launch/train.py", "--model_name_or_path", "builtin:micro-llama",
                             "--max_steps", "2", "--data.train_size", "32", "--data.eval_size", "8",
                             "--output_dir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    ended = time.time()
    assert result.returncode == 0, result.stderr[-2000:]
    phases = json.loads((tmp_path / "run" / "summary.json").read_text())["phases"]
    assert list(phases)[:len(PHASES)] == PHASES
    assert all(phases[name] >= 0 for name in PHASES)
    # the phases from main's start to the first step's end are the recorded total, to rounding
    assert abs(sum(phases[name] for name in PHASES[1:]) - phases["start_to_first_step"]) < 0.02
    assert started < phases["first_step_done_unix_s"] < ended
    assert {"training_after_first_step", "eval_after", "save"} <= set(phases)
