"""A rank that dies or freezes: the other ranks exit non-zero within collective_timeout_s and
say which rank stopped. Two "nodes" on this machine (one deepspeed launcher each, --no_ssh),
so that no launcher can see the other node's rank die and clean up for it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launch_helpers import REPO, start_two_nodes

pytestmark = pytest.mark.launcher

TIMEOUT_S = 20
ARGS = ["--method", "bilora", "--hypergrad", "first_order", "--max_steps", "100000", "--eval_steps", "0",
        "--log_steps", "1", "--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64",
        "--data.eval_size", "8", "--micro_batch_size", "2", "--collective_timeout_s", str(TIMEOUT_S)]


def wait_for_training(out: Path, nodes: list[subprocess.Popen], steps: int = 3) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for node in nodes:
            if node.poll() is not None:
                raise AssertionError(f"a node exited before training started: {node.communicate()[0][-3000:]}")
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if sum("train_loss" in row for row in rows) >= steps:
                return
        time.sleep(0.5)
    raise AssertionError("training did not start")


def rank_process(launcher: subprocess.Popen) -> psutil.Process:
    (child,) = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                if any(part.startswith("--local_rank=") for part in p.cmdline())]
    return child


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_survivor_exits_within_the_timeout_and_names_the_failed_rank(tmp_path, how):
    out = tmp_path / "run"
    nodes = start_two_nodes(tmp_path, ["--ds_config", str(REPO / "ds_configs" / "cpu_zero2.json"), *ARGS,
                                       "--output_dir", str(out)])
    victim = None
    try:
        wait_for_training(out, nodes)
        victim = rank_process(nodes[1])
        victim.send_signal(getattr(signal, how))  # killed, or frozen (a hung node)
        failed_at = time.monotonic()
        output = nodes[0].communicate(timeout=TIMEOUT_S + 60)[0]
        waited = time.monotonic() - failed_at
    finally:
        for process in [victim, *(psutil.Process(n.pid) for n in nodes if n.poll() is None)]:
            if process is not None and process.is_running():
                for p in [*process.children(recursive=True), process]:
                    p.kill()
    print(f"{how}: the survivor exited with {nodes[0].returncode} after {waited:.1f} s")  # docs/failures.md
    assert nodes[0].returncode != 0
    assert waited < TIMEOUT_S + 15, waited  # bounded by the setting (plus naming the rank, 3 s)
    errors = [line for line in output.splitlines() if line.startswith("error: rank 0:")]
    assert errors and "rank(s) [1] stopped responding" in errors[-1], output[-3000:]
