"""Start-up (issue 13 item 2): the builtin weights are the seeded values whatever the build path,
a run records where its launch spent its time, also when started without a launcher, and
validation's builtin skeleton is transformers' own layout."""

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


def test_the_builtin_skeleton_is_transformers_own_layout():
    """Validation checks a builtin LLaMA's targets and ranks on a module tree built without
    transformers' modelling code (model_checks.builtin_llama_skeleton): for every builtin LLaMA it is
    transformers' own meta-device model in everything those checks read (module names and class
    names, linear shapes, parameters, the output head), its vocabulary the tokenizer's."""
    from ds_bilevel.adapters.base import layer_features
    from ds_bilevel.adapters.inject import output_layer_names
    from ds_bilevel.builtin.model import BUILTIN_MODELS
    from ds_bilevel.config import RunConfig
    from ds_bilevel.model_checks import builtin_llama_skeleton, model_skeleton

    def layout(model):
        return ([(name, type(module).__name__, layer_features(module),
                  [(key, tuple(p.shape), p.device.type) for key, p in module.named_parameters(recurse=False)])
                 for name, module in model.named_modules()], output_layer_names(model))

    for name in (f"builtin:{key}" for key in BUILTIN_MODELS):
        assert layout(builtin_llama_skeleton(name)) == layout(model_skeleton(RunConfig(model_name_or_path=name))), name


def test_known_noise_is_dropped_by_its_exact_message(capsys):
    """Issue 18: the untested-optimizer record and torch's all_gather_into_tensor FutureWarning are
    dropped; other records and warnings, even close ones, stay."""
    import logging
    import warnings

    from ds_bilevel.distributed import UNTESTED_OPTIMIZER, quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter on the logger
    logger = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DropRecord" for f in logger.filters) == 1
    kept = []
    handler = logging.Handler()
    handler.emit = lambda record: kept.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(UNTESTED_OPTIMIZER)
        logger.warning("You are using ZeRO with an untested optimizer in another way")
    finally:
        logger.removeHandler(handler)
    assert kept == ["You are using ZeRO with an untested optimizer in another way"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()  # on top of catch_warnings' fresh filters
        message = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                   "`torch.distributed.all_gather_single` instead.")
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.all_reduce` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn(message, UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)[:30]) for w in caught] == [
        (FutureWarning, "`torch.distributed.all_reduce`"), (UserWarning, "`torch.distributed.all_gather_")]


def test_dropping_lines_passes_every_other_line(capsys):
    from ds_bilevel.distributed import SHM_OP_BUILT, dropping_lines

    with dropping_lines(SHM_OP_BUILT):
        print("before")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, and more")
        print("part", end="")
        print(" of a line", end="")
    assert capsys.readouterr().out == ("before\nDeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built "
                                       "successfully, and more\npart of a line")


def test_a_refusal_is_printed_by_rank_0_at_once_and_by_another_rank_after_a_wait(monkeypatch, capsys):
    """Rank 0 prints its refusal at once; another rank waits for the launcher to end it (rank 0 refused
    too) and prints only when still alive: a refusal of its own (issue 18, "one line, once")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "0")
    train.refuse("error: x: 1 must be > 2")
    assert slept == [] and capsys.readouterr().err == "error: x: 1 must be > 2\n"
    monkeypatch.setenv("RANK", "1")
    train.refuse("error: x: 1 must be > 2")
    assert slept == [train.REFUSAL_WAIT_S] and capsys.readouterr().err == "error: x: 1 must be > 2\n"
