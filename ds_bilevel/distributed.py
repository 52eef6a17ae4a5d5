"""Process-level helpers for DeepSpeed on CPU ranks."""

from __future__ import annotations

import glob
import os


def release_shm_buffers() -> int:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers in /dev/shm; returns how many.

    DeepSpeed's shared-memory all-reduce (CPU accelerator) creates
    /dev/shm/deepspeed_allreduce_buffer_<i>_<master addr>_<master port>_<rank> and never
    removes them: about 70 MB per rank per launch, which filled this machine's 24 GB
    /dev/shm after a few hundred test launches. Call once at the end of a process, after
    its last collective (the mapping stays valid until exit; only the name goes).
    """
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if not (addr and port and rank):
        return 0
    removed = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
