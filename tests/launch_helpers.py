"""Helpers for tests that run the real deepspeed launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(folder: Path, stage: int, bf16: bool) -> Path:
    path = folder / f"ds_stage{stage}_{'bf16' if bf16 else 'fp32'}.json"
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": bf16},
              # Persistence threshold 0: ZeRO-3 must really partition the tiny test weights.
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**6}
    path.write_text(json.dumps(config))
    return path


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment every multi-process test runs in: CPU accelerator, one thread per rank."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def launch(args: list[str], num_ranks: int = 2, timeout: int = 600, script: Path = REPO / "launch" / "train.py",
           **env_extra: str) -> subprocess.CompletedProcess:
    """Run launch/train.py (or ``script``) through the real `deepspeed` launcher on CPU ranks."""
    env = cpu_env(**env_extra)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
               "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_in_one_process(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python launch/train.py`` on one CPU rank, without the launcher (as a one-GPU user may run it):
    for behaviour that does not depend on the number of ranks, at a third of a 2-rank launch's time."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_two_nodes(folder: Path, args: list[str]) -> list[subprocess.Popen]:
    """Two "nodes" on this machine: one deepspeed launcher each (hostfile, --no_ssh, --node_rank),
    one rank per node, running launch/train.py ``args``; output on each Popen's stdout."""
    hostfile, port = folder / "hostfile", free_port()
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(REPO / "launch" / "train.py"), *args],
        cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


def doc_commands(markdown: str, heading: str) -> list[str]:
    """The commands of the first ```bash block under ``heading`` in a document: continuation lines
    joined, comment lines dropped."""
    section = markdown[markdown.index(heading):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def start_documented_loopback(folder: Path, args: list[str]) -> list[subprocess.Popen]:
    """docs/cluster.md's loopback recipe as written (the hostfile, then one launcher per "node"),
    with a free port, the hostfile in ``folder`` and launch/train.py ``args`` in place of the
    documented ones. The launchers' Popens in node-rank order, output on stdout."""
    import shlex

    commands = doc_commands((REPO / "docs" / "cluster.md").read_text(), "## Two nodes on one machine (loopback)")
    port, nodes = str(free_port()), {}
    assert commands[0].startswith("printf ") and commands[-1] == "wait", commands
    subprocess.run(["bash", "-c", commands[0]], cwd=folder, check=True)
    for command in commands[1:-1]:
        words = shlex.split(command.removesuffix("&"))
        env = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))
        words = [word for word in words if not ("=" in word and not word.startswith("-"))]
        assert words[0] == "deepspeed", words
        launcher = words[1:words.index("launch/train.py")]
        launcher[launcher.index("--master_port") + 1] = port
        launcher[launcher.index("--hostfile") + 1] = str(folder / launcher[launcher.index("--hostfile") + 1])
        node_rank = int(launcher[launcher.index("--node_rank") + 1])
        nodes[node_rank] = subprocess.Popen(
            [sys.executable, "-m", "deepspeed.launcher.runner", *launcher, str(REPO / "launch" / "train.py"), *args],
            cwd=REPO, env=cpu_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return [nodes[rank] for rank in sorted(nodes)]


def run_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


# Small settings shared by launcher tests: the micro model trains in seconds.
FAST_ARGS = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "256",
             "--data.eval_size", "32", "--micro_batch_size", "4", "--learning_rate", "2e-2",
             "--warmup_ratio", "0", "--checksum_base", "true"]


def run_script(script: str, out: Path, num_ranks: int) -> None:
    """Run tests/scripts/<script> OUT through the deepspeed launcher on CPU ranks."""
    env = cpu_env()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks), "--master_port",
               str(free_port()), str(REPO / "tests" / "scripts" / script), str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
