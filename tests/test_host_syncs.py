"""No host syncs between micro-batches, and at most one per optimizer step (issue 13): counted on
CPU ranks by tests/scripts/host_syncs.py, so that a GPU regression shows without a GPU."""

import json

import pytest
from launch_helpers import run_script

pytestmark = pytest.mark.launcher


def test_lora_bilora_sam_and_bilevel_steps_read_the_device_once(tmp_path):
    """2 ranks, ZeRO-2 bf16, 4 micro-batches per step: the only read is the optimizer's finite-step
    flag (all ranks agree to skip), none in the passes, the loss, Bi-LoRA's clip or the
    hypergradients' central differences (darts: 2 perturbed passes; neumann: 3 products). ZeRO-1/2
    call the client optimizer once per param group: Bi-LoRA steps its two levels, so two flags."""
    run_script("host_syncs.py", tmp_path, 2)
    results = json.loads((tmp_path / "syncs.json").read_text())
    groups = {"lora": 1, "bilora_sam": 2, "bidora darts": 1, "bidora neumann": 1}
    assert set(results) == set(groups)
    for method, result in results.items():
        syncs = dict(result["syncs"])
        assert syncs == {"optim.py:all_ranks_finite": groups[method] * result["steps"]}, (method, syncs)
