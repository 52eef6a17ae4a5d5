"""Test session set-up. Helpers that tests import live in launch_helpers.py: pytest keeps one
module named ``conftest`` per session, so nothing may import from a conftest."""

import glob
import os
import time

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
