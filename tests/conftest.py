"""Test session set-up. Helpers that tests import live in launch_helpers.py: pytest keeps one
module named ``conftest`` per session, so nothing may import from a conftest."""

import glob
import os
import time

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
_SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Safety net for launches that died before releasing DeepSpeed's /dev/shm buffers
    (ds_bilevel.distributed.release_shm_buffers): remove those this session created."""
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.stat(path).st_mtime >= _SESSION_START - 1:
                os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def invariance_matrix(tmp_path_factory):
    """tests/scripts/invariance.py through the launcher, once per session (one launch per world
    size): a run folder OUT/<row name>/ for every row of the invariance matrix. Used by the
    engine's invariance test and by the export test."""
    from launch_helpers import run_script

    out = tmp_path_factory.mktemp("invariance")
    for num_ranks in (1, 2):
        run_script("invariance.py", out, num_ranks)
    return out


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The export tests' base: run_folders.save_llama_base, once per session."""
    from run_folders import save_llama_base

    return save_llama_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def hf_run(base_dir, tmp_path_factory):
    """hf_run(method) -> run_folders.Run on the HF-folder base (one per method, shared by the export
    tests of tests/test_export.py and tests/test_export_output.py)."""
    import torch
    from run_folders import adapted_run
    from transformers import AutoModelForCausalLM

    runs = {}

    def get(method: str):
        if method not in runs:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            runs[method] = adapted_run(tmp_path_factory.mktemp(f"run_{method}"), model, str(base_dir), method)
        return runs[method]

    return get
