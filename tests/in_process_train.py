"""launch/train.py's main() in this process with its TrainingRecipe replaced (no training): the
set-up of the in-process refusal tests (tests/test_reliability_inputs.py, tests/test_bad_input.py).
Each test module wraps these in fixtures of its own."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from launch_helpers import REPO

MICRO = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "64", "--data.eval_size", "8",
         "--micro_batch_size", "4"]
RUN = [*MICRO, "--method", "lora", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "0"]


class Started(Exception):
    """The fake recipe's setup: validation passed and the run would have started."""


def load_train_entry(name: str):
    """launch/train.py as a module (it is a script), under ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replace_recipe(monkeypatch) -> dict:
    """TrainingRecipe replaced: setup() records the folder as the run found it, then stops."""
    monkeypatch.chdir(REPO)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    class Fake:
        def __init__(self, run, ds_config, phases=None):
            seen["run"], seen["ds_config"] = run, ds_config

        def setup(self):
            out = Path(seen["run"].output_dir)
            seen["files"] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            raise Started

    monkeypatch.setattr("ds_bilevel.recipe.TrainingRecipe", Fake)
    return seen


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def refused(train, argv, capsys, starts: str, folder: Path | None = None, *contains: str) -> str:
    """main(argv) exits 2 with exactly one line starting ``error: <starts>`` and ``folder`` unchanged."""
    before = snapshot(folder) if folder is not None else None
    code = train.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {starts}"), (code, lines)
    for part in contains:
        assert part in lines[0], (part, lines[0])
    if folder is not None:
        assert snapshot(folder) == before
    return lines[0]
