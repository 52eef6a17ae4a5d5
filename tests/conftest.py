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
def invariance_runs(tmp_path_factory):
    """tests/scripts/invariance.py through the launcher, once per world size per session:
    run folders OUT/<case>/<stage>/ of every method at every ZeRO stage (fp32). Used by the
    engine's invariance test and by the export test."""
    from launch_helpers import run_script

    done = {}

    def runs(num_ranks: int):
        if num_ranks not in done:
            out = tmp_path_factory.mktemp(f"invariance-{num_ranks}-ranks")
            run_script("invariance.py", out, num_ranks)
            done[num_ranks] = out
        return done[num_ranks]

    return runs
