"""launch/train.py with one fault injected, chosen by the FAULT environment variable:

- ``kill_in_save:RANK:CALL``: rank RANK writes half of its CALL-th checkpoint file (counting
  from 1 over the run) and is killed with SIGKILL, as a job cancelled mid-save would be;
- ``nan_loss:STEPS``: the loss of the inner steps with these indices (comma-separated,
  0-based) is multiplied by NaN, so their gradients are NaN on every rank.
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_in_save(rank: int, call: int) -> None:
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original, calls = TorchCheckpointEngine.save, [0]

    def save(self, state_dict, path):
        calls[0] += 1
        if int(os.environ["RANK"]) == rank and calls[0] == call:
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, state_dict, path)

    TorchCheckpointEngine.save = save


def nan_loss(steps: set[int]) -> None:
    from ds_bilevel.engine import BilevelEngine

    inner_step, forward_loss = BilevelEngine.inner_step, BilevelEngine.forward_loss

    def poisoned_inner_step(self, batch):
        self.poisoned = self.scheduler.steps["inner"] in steps
        try:
            return inner_step(self, batch)
        finally:
            self.poisoned = False

    def poisoned_forward_loss(self, *args, **kwargs):
        loss, summed = forward_loss(self, *args, **kwargs)
        if getattr(self, "poisoned", False):
            return loss * float("nan"), float("nan")
        return loss, summed

    BilevelEngine.inner_step, BilevelEngine.forward_loss = poisoned_inner_step, poisoned_forward_loss


if __name__ == "__main__":
    kind, _, spec = os.environ["FAULT"].partition(":")
    if kind == "kill_in_save":
        kill_in_save(*(int(x) for x in spec.split(":")))
    elif kind == "nan_loss":
        nan_loss({int(x) for x in spec.split(",")})
    else:
        raise SystemExit(f"unknown FAULT {kind!r}")
    sys.argv[0] = str(REPO / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
