"""Checkpoints through DeepSpeed's save/load, plus the state DeepSpeed does not know about.

DeepSpeed saves the module's trainable parameters (``exclude_frozen_parameters``: the
frozen base is not written again at every checkpoint), both levels' fp32 masters and Adam
moments (one optimizer, level-tagged groups) at every ZeRO stage. The client state adds
what makes a resume exact: the position in the schedule (the batch order is a pure
function of it), both levels' learning-rate schedules, the RNG states, the D1/D2 split and
the losses the summary needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"


def tag(inner_steps: int) -> str:
    return f"step{inner_steps}"


def resolve(resume_from: str, output_dir: Path) -> tuple[Path, str]:
    """(DeepSpeed load_dir, tag) for ``latest`` or a checkpoint folder (a tag folder or the
    folder holding DeepSpeed's ``latest`` file)."""
    folder = output_dir / CHECKPOINT_DIR if resume_from == "latest" else Path(resume_from)
    if (folder / "latest").is_file():
        return folder, (folder / "latest").read_text().strip()
    if folder.is_dir() and any(folder.glob("*model_states.pt")):
        return folder.parent, folder.name
    raise ValueError(f"resume_from_checkpoint: {resume_from!r} is not a checkpoint "
                     f"(no 'latest' file in {folder} and no DeepSpeed model states)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
