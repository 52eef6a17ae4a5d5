"""Every command in README.md, docs/usage.md and docs/cluster.md is accounted for here, and each
does what its text says (issue 18):

- ``demo``: the README's demo, run once as written; the README's summary block must be what it
  prints (tests/scripts/readme_demo.py regenerates the block);
- ``run``: launched as written, shortened (fewer steps, less data) and into a scratch folder;
- ``validate``: commands for GPUs, clusters or files this machine has not: their settings go
  through launch/train.py's whole validation at the stated world size, the user's paths replaced
  by stand-ins (``STAND_INS``); where another test runs the same launcher path, ``also`` names it;
- ``ci``: installing and the test suite itself (what CI does).

A new command in those documents fails ``test_every_documented_command_is_covered`` until it has
an entry in ``COVERAGE``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys

import pytest
from launch_helpers import REPO, cpu_env, free_port

DOCS = ("README.md", "docs/usage.md", "docs/cluster.md")
# A short run: a couple of steps on little data, no evaluation inside the loop.
SHORT = ["--max_steps", "2", "--data.train_size", "160", "--data.eval_size", "16", "--eval_steps", "0"]

# (a substring that identifies the command, kind, detail). Order matters only for reading.
COVERAGE = [
    ('pip install torch==2.13.0 && pip install -e ".[dev]" && DS_ACCELERATOR=cpu deepspeed', "demo", ""),
    ("DS_ACCELERATOR=cpu python -m pytest -q", "ci", "the test suite"),
    ('python -m pytest -q -m "not launcher"', "ci", "the test suite without the launcher tests"),
    ("pip install torch==2.13.0", "ci", "CI's environment"),
    ('pip install -e ".[dev]"', "ci", "CI's environment"),
    ("--method lora --output_dir runs/demo --overwrite_output_dir true", "demo", ""),
    ("--method bidora --hypergrad darts --unroll_steps 1 --split_ratio 0.8 --output_dir runs/bidora", "run",
     "the export commands read its output"),
    ("python launch/export.py --checkpoint_dir runs/bidora", "run", "on the bi-level run's output"),
    ("--method bilora --hypergrad cg --bilevel.cg_steps 3 --unroll_steps 2 --output_dir runs/bilora-cg", "run", ""),
    ("--model_name_or_path /models/llama --dataset data/train.jsonl --output_dir runs/llama-dora", "validate", ""),
    ("--model_name_or_path builtin:tiny-roberta --dataset sst2.csv", "validate",
     "tests/test_classification.py::test_two_rank_encoder_training_learns_and_exports"),
    ("--model_name_or_path builtin:llama-2-7b-shape", "validate", "bench/scale7b.py runs it (13 min)"),
    ("cat > hostfile <<'HOSTS'", "validate", "the hostfile the next commands read"),
    ("deepspeed --hostfile hostfile launch/train.py", "validate", "needs ssh to the nodes (pdsh)"),
    ("deepspeed --hostfile hostfile --no_ssh --node_rank", "validate",
     "tests/test_launchers.py::test_two_node_darts_at_zero3_matches_one_rank"),
    ("printf 'node-a slots=1\\nnode-b slots=1\\n' > hostfile.loopback", "validate",
     "tests/test_launchers.py::test_two_node_darts_at_zero3_matches_one_rank"),
    ("deepspeed --hostfile hostfile.loopback --no_ssh", "validate",
     "tests/test_launchers.py::test_two_node_darts_at_zero3_matches_one_rank"),
    ("wait", "ci", "the shell's wait for the loopback recipe's first launcher"),
    ("sbatch --nodes 4 --gpus-per-node 8 launch/slurm_train.sh", "validate",
     "tests/test_launchers.py::test_slurm_script_runs_two_nodes"),
    ("accelerate launch --use_deepspeed", "validate",
     "tests/test_launchers.py::test_accelerate_launch_with_its_deepspeed_plugin"),
]


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command of every ```bash block: continuation lines joined,
    comments dropped, a heredoc kept with its command."""
    out = []
    for name in DOCS:
        text = (REPO / name).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            lines = block.replace("\\\n", " ").splitlines()
            while lines:
                command = lines.pop(0).split("  #")[0].strip()
                if not command or command.startswith("#"):
                    continue
                heredoc = re.search(r"<<'(\w+)'", command)
                if heredoc:  # the command, then its lines up to the end marker
                    end = lines.index(heredoc.group(1))
                    command, lines = "\n".join([command, *lines[:end + 1]]), lines[end + 1:]
                else:
                    command = " ".join(command.split())
                out.append((name, command))
    return out


def coverage(command: str) -> tuple[str, str, str]:
    """The first COVERAGE entry whose substring the command holds."""
    matches = [entry for entry in COVERAGE if entry[0] in command]
    assert matches, f"no COVERAGE entry for the documented command {command!r}"
    return matches[0]


def test_every_documented_command_is_covered():
    commands = documented_commands()
    used = {coverage(command)[0] for _, command in commands}
    assert used == {entry[0] for entry in COVERAGE}, f"stale COVERAGE entries: {({e[0] for e in COVERAGE}) - used}"
    for _, _, also in COVERAGE:
        if "::" in also:  # the named test exists
            path, function = also.split("::")
            assert f"def {function}(" in (REPO / path).read_text(), also


def test_the_readme_keeps_two_setup_commands_and_usage_runs_the_same_demo():
    readme = (REPO / "README.md").read_text()
    setup = readme[readme.index("## Set up and run"):readme.index("## What you can do today")]
    assert setup.count("```bash") == 2
    demo = documented_commands()[0][1].split("&&")[-1].strip()
    assert ("docs/usage.md", demo) in documented_commands()


# ---- validate: the settings of commands this machine cannot run --------------------------------
def _train_module():
    spec = importlib.util.spec_from_file_location("train_for_docs", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _world_size(words: list[str], hostfile_slots: int) -> int:
    """The ranks the command starts: --num_gpus, the hostfile's slots, sbatch's nodes x GPUs, or
    accelerate's --num_processes."""
    def value(flag: str, default: int) -> int:
        return int(words[words.index(flag) + 1]) if flag in words else default

    if words[0] == "sbatch":
        return value("--nodes", 1) * value("--gpus-per-node", 1)
    if words[:2] == ["accelerate", "launch"]:
        return value("--num_processes", 1)
    return value("--num_gpus", hostfile_slots if "--hostfile" in words else 1)


def _stand_ins(tmp_path) -> dict[str, str]:
    """The user's files, replaced: a model folder by the builtin tiny LLaMA, data files by files
    with the documented fields, DS.json by the config its comment describes."""
    rows = "\n".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) for i in range(3000))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "sst2.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(600)))
    ds = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=3e8, stage3_prefetch_bucket_size=5e7)
    (tmp_path / "DS.json").write_text(json.dumps(ds))
    return {"/models/llama": "builtin:tiny-llama", "data/train.jsonl": str(tmp_path / "train.jsonl"),
            "data.jsonl": str(tmp_path / "train.jsonl"), "sst2.csv": str(tmp_path / "sst2.csv"),
            "DS.json": str(tmp_path / "DS.json")}


def test_commands_this_machine_cannot_run_pass_validation(tmp_path, monkeypatch):
    """Each ``validate`` command's launch/train.py settings, at the world size it starts, pass the
    whole pre-launch validation (settings, DeepSpeed config, model skeleton, data, output_dir)."""
    for name in ("MASTER_PORT", "RANK", "LOCAL_RANK"):  # as before a launch: no port is checked
        monkeypatch.delenv(name, raising=False)
    train = _train_module()
    stand_ins = _stand_ins(tmp_path)
    hostfile_slots = 0
    checked = []
    for _, command in documented_commands():
        if coverage(command)[1] != "validate":
            continue
        if command.startswith(("cat > hostfile", "printf ")):
            text = command.split("\n", 1)[1] if "\n" in command else shlex.split(command)[1].replace("\\n", "\n")
            hostfile_slots = sum(int(slots) for slots in re.findall(r"slots=(\d+)", text))
            continue
        words = shlex.split(command.removesuffix("&"))
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # DS_ACCELERATOR=cpu
        script = next(i for i, w in enumerate(words) if w.endswith(("launch/train.py", "launch/slurm_train.sh")))
        argv = [stand_ins.get(w, w) for w in words[script + 1:] if w != "..."]
        argv += ["--output_dir", str(tmp_path / f"out{len(checked)}")]
        world = _world_size(words, hostfile_slots)
        monkeypatch.setenv("WORLD_SIZE", str(world))
        run, _ = train.validated_settings(argv)  # a ValueError names the bad setting
        checked.append((world, run.adapter.method))
    assert [w for w, _ in checked] == [8, 2, 2, 16, 16, 16, 2, 2, 32, 16], checked


# ---- run: shortened, launched as written -------------------------------------------------------
def _launch(command: str, tmp_path, extra: list[str]) -> subprocess.CompletedProcess:
    """A documented `deepspeed ... launch/train.py ...` command with ``extra`` flags appended (the
    last value of a flag wins), a free port and its output_dir in ``tmp_path``."""
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    assert words[0] == "deepspeed", words
    out = tmp_path / words[words.index("--output_dir") + 1]
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), *words[1:],
            *extra, "--output_dir", str(out)]
    return subprocess.run(argv, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=900)


def _command(substring: str) -> str:
    return next(command for _, command in documented_commands() if substring in command)


@pytest.mark.launcher
def test_readme_bilevel_zero3_run_and_its_exports(tmp_path):
    """The README's BiDoRA darts ZeRO-3 command (2 steps), then its export commands (merged and
    PEFT) on the run folder: transformers loads the merged model as it is."""
    result = _launch(_command("--output_dir runs/bidora"), tmp_path, SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "bidora"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and "bidora" in result.stderr
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3

    export = _command("python launch/export.py")
    spec = importlib.util.spec_from_file_location("export_for_docs", REPO / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for form in ("merged", "peft"):  # the documented command, and its "# or --format peft"
        argv = shlex.split(export, comments=True)[2:]
        argv = [str(run) if w == "runs/bidora" else str(tmp_path / f"{form}") if w == "merged/" else w for w in argv]
        argv[argv.index("--format") + 1] = form
        assert module.main(argv) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "llama"
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


@pytest.mark.launcher
def test_usage_bilora_cg_run(tmp_path):
    """docs/usage.md's BiLoRA cg command at ZeRO-3 (2 steps): the summary reports each level's
    relative change."""
    result = _launch(_command("--output_dir runs/bilora-cg"), tmp_path, SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "bilora-cg" / "summary.json").read_text())
    assert summary["world_size"] == 2 and set(summary["relative_change"]) == {"inner", "outer"}
    assert "== ds_bilevel run summary ==" in result.stdout


# ---- demo: the README's block is what the demo prints ------------------------------------------
@pytest.mark.launcher
def test_readme_demo_prints_the_documented_summary(tmp_path):
    """The demo, run once as written (about two minutes): its summary is the README's block, but
    for the throughput (tokens/s and seconds). On a mismatch: python tests/scripts/readme_demo.py."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    import readme_demo

    stdout, _ = readme_demo.run_demo(tmp_path)
    printed = readme_demo.printed_block(stdout, tmp_path)
    assert readme_demo.agree(printed, readme_demo.readme_block()), (
        f"README.md's demo block is stale; run `python tests/scripts/readme_demo.py`. The run printed:\n{printed}")


def test_the_demo_block_comparison_allows_a_library_s_rounding_only():
    """agree: the same lines but for the throughput, each number within 0.01 (a library release
    moved the final loss by 0.002 once); a larger move, another line or a changed word disagrees."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    import readme_demo

    documented = readme_demo.readme_block()
    final = documented.split("eval loss")[1].split("->")[1].split()[0]
    nudged = f"{float(final) + 0.002:.4f}"
    assert readme_demo.agree(documented.replace(final, nudged), documented)
    assert not readme_demo.agree(documented.replace(final, f"{float(final) + 0.05:.4f}"), documented)
    assert not readme_demo.agree(documented.replace("exact match", "exact matches"), documented)
    import re

    other_times = re.sub(r"\d+ tokens/s(.*) steps in [\d.]+ s", r"12 tokens/s\1 steps in 999.9 s", documented)
    assert other_times != documented and readme_demo.agree(other_times, documented)  # the throughput is not compared


# ---- bench: every option described -------------------------------------------------------------
@pytest.mark.parametrize("name", ["peer", "methods", "zero3_scaling", "scale7b", "memory_estimate", "generalisation",
                                  "perturbation_bf16"])
def test_bench_help_describes_every_option(name, monkeypatch, capsys):
    import argparse

    from bench.__main__ import main

    parsers = []
    original = argparse.ArgumentParser.parse_args

    def record(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: python -m bench {name}" in capsys.readouterr().out
    undescribed = [action.dest for action in parsers[0]._actions if not action.help]
    assert not undescribed, f"python -m bench {name}: options without a description: {undescribed}"


def test_memory_estimate_prints_the_usage_table(capsys):
    from bench.memory_estimate import main

    main([])
    rows = capsys.readouterr().out.strip().splitlines()
    usage = (REPO / "docs" / "usage.md").read_text()
    assert len(rows) == 6 and all(row in usage for row in rows)
