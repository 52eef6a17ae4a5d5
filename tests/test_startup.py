"""Start-up (issue 13 item 2): the builtin weights are the seeded values whatever the build path,
a run records where its launch spent its time, also when started without a launcher, and what
makes the start shorter keeps the results: validation's builtin skeleton, batched tokenisation,
DeepSpeed's deferred compilation, skipping the evaluation before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
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
    mpi4py) and summary.json's phases add up to the time to its first step. The same launch skips
    the evaluation before training (eval_before_training false): no step-0 line, null "before"
    numbers, printed as n/a, and the evaluation after training as usual."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                            "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    started = time.time()
    result = subprocess.run([sys.executable, "launch/train.py", "--model_name_or_path", "builtin:micro-llama",
                             "--max_steps", "2", "--data.train_size", "32", "--data.eval_size", "8",
                             "--eval_before_training", "false", "--output_dir", str(tmp_path / "run")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    phases = summary["phases"]
    assert list(phases)[:len(PHASES)] == PHASES
    assert all(phases[name] >= 0 for name in PHASES)
    # the phases from main's start to the first step's end are the recorded total, to rounding
    assert abs(sum(phases[name] for name in PHASES[1:]) - phases["start_to_first_step"]) < 0.02
    assert started < phases["first_step_done_unix_s"] < ended
    assert {"training_after_first_step", "eval_after", "save"} <= set(phases)
    assert summary["eval_loss_before"] is None and summary["exact_match_before"] is None
    assert isinstance(summary["eval_loss_after"], float) and isinstance(summary["exact_match_after"], float)
    evaluations = [row["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                   if "eval_loss" in (row := json.loads(line))]
    assert evaluations == [2]
    assert "eval loss      n/a -> " in result.stdout and "exact match    n/a -> " in result.stdout


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


def _one_text_per_call(records, tokenizer, config, labels=None):
    """data.tokenize as it was before it encoded in batches (one example per call): the reference."""
    from ds_bilevel.data import IGNORE_INDEX, class_id

    eos = tokenizer.eos_token_id
    if labels is not None:
        closing = set(tokenizer.all_special_ids)

        def encode_class(example):
            ids = tokenizer(example["prompt"]).input_ids
            if eos is not None and not (ids and ids[-1] in closing):
                ids = ids + [eos]
            if len(ids) > config.max_length and ids[-1] in closing:  # the closing token stays
                ids = ids[: config.max_length - 1] + ids[-1:]
            return {"input_ids": ids[: config.max_length], "labels": class_id(example["label"], labels)}

        return records.map(encode_class, remove_columns=records.column_names)
    use_template = config.format == "instruction" and config.chat_template and bool(tokenizer.chat_template)

    def encode(example):
        if use_template:
            prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}],
                                                        add_generation_prompt=True, tokenize=True, return_dict=False))
        else:
            prompt = tokenizer(example["prompt"] + "\n").input_ids
        response = tokenizer(example["response"], add_special_tokens=False).input_ids + [eos]
        room = max(config.max_length - len(response), 1)
        if len(prompt) > room:  # cut after BOS
            keep = int(prompt[0] == tokenizer.bos_token_id)
            prompt = prompt[:keep] + prompt[len(prompt) - room + keep:]
        return {"input_ids": (prompt + response)[: config.max_length],
                "labels": ([IGNORE_INDEX] * len(prompt) + response)[: config.max_length]}

    return records.map(encode, remove_columns=records.column_names)


def test_tokenising_in_batches_gives_the_ids_of_one_text_per_call():
    """data.tokenize encodes a batch of texts per tokenizer call (issue 13): the same ids, labels and
    column types as one text per call, with and without a chat template, truncated or not, and for
    class labels."""
    from datasets import Dataset

    from ds_bilevel.data import DataConfig, load_records, tokenize
    from ds_bilevel.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-llama")
    train, _ = load_records("builtin:instruct", DataConfig(train_size=300, eval_size=1), seed=3)
    cases = [(train, DataConfig(), None), (train, DataConfig(max_length=12), None)]
    classes = Dataset.from_list([{"prompt": row["prompt"], "response": row["response"], "label": ["no", "yes"][i % 2]}
                                 for i, row in enumerate(train.select(range(40)))])
    cases.append((classes, DataConfig(format="classification", max_length=10), ["no", "yes"]))
    for records, config, labels in cases:
        batched = tokenize(records, tokenizer, config, labels)
        assert batched.to_list() == _one_text_per_call(records, tokenizer, config, labels).to_list()
        assert batched.features == _one_text_per_call(records, tokenizer, config, labels).features
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %} [assistant]"
    assert (tokenize(train, tokenizer, DataConfig()).to_list()
            == _one_text_per_call(train, tokenizer, DataConfig()).to_list())


@pytest.mark.parametrize("deferred", [True, False])
def test_deepspeed_compiles_at_the_first_call_not_at_import(deferred):
    """DeepSpeed's ZeRO optimizer imports its Muon module in every launch, whose torch.compile
    decorations import torch's Inductor (1.4 s): distributed.defer_deepspeed_compile makes them
    compile at their first call instead, once (without it, Inductor comes in with the import)."""
    script = f"""
import sys, torch
from ds_bilevel.distributed import defer_deepspeed_compile
if {deferred}:
    assert defer_deepspeed_compile() and defer_deepspeed_compile()  # idempotent
from deepspeed.runtime.zero.muon import muon_optimizer  # what is_zero_supported_optimizer imports
print("inductor", "torch._inductor.compile_fx" in sys.modules)
if {deferred}:
    from deepspeed.runtime import compiler
    compiled = []
    torch.compile = lambda function, **kwargs: compiled.append(function) or function
    double = compiler.compile()(lambda x: 2 * x)
    assert compiled == [] and double(3) == 6 and double(4) == 8 and len(compiled) == 1
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"inductor {not deferred}" in result.stdout


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
