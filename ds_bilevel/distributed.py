"""Process-level helpers for DeepSpeed on CPU ranks."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys


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


def trim_forward_stack(root) -> None:
    """ZeRO-3's stack of modules in forward (DeepSpeed 0.19.8, ``parameter_offload.FWD_MODULE_STACK``)
    back to what it holds between steps: everything above ``root``, which DeepSpeed pushes at set-up.
    What lies above it between steps are modules a checkpointed recomputation entered and never
    left: torch's non-reentrant checkpoint stops recomputing as soon as it has the tensors the
    backward needs, inside a block, so those modules' post-forward hooks never pop them. Left
    there, the stack grew by a few entries per layer at every step of a run (builtin:micro-llama:
    8 per LoRA step, 32 per BiDoRA darts cycle), each holding a module. Between steps no forward
    is running, so nothing above the root is in use; a host-side list, no device work."""
    from deepspeed.runtime.zero import parameter_offload

    stack = parameter_offload.FWD_MODULE_STACK
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is root:
            del stack[index + 1:]
            return


def destroy_engine(engine) -> None:
    """Free a DeepSpeed engine's model, optimizer states and buffers now, in a process that goes on.

    Without it a finished engine outlives every Python reference (measured: alive after
    gc.collect): DeepSpeed's gradient hooks sit on the parameters' autograd nodes, in C++, which
    the garbage collector cannot see through; ``engine.destroy()`` removes them. ZeRO-3 also keeps
    the model at module level (DeepSpeed 0.19.8), dropped here: the stack of modules in forward,
    which holds the root from set-up on and every module a recomputation entered (checkpointing
    stops it early, inside a block, so their post-forward hooks never pop them), and the
    coordinator's unbounded cache, keyed by submodule, of which parameters each releases (a
    cache: clearing it costs another live engine one lookup per submodule)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    ours = {id(m) for m in engine.module.modules()}
    engine.destroy()
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(method, "__closure__", None) or ():  # the lru_cache, under DeepSpeed's instrument_w_nvtx
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (CPU ranks under ZeRO-3).

    glibc serves allocations below its mmap threshold from the heap and keeps them resident
    after free, and it raises that threshold (up to 32 MB) after the first large free. ZeRO-3
    gathers and frees each parameter (a 2048 x 5632 bf16 matrix is 23 MB) at every forward
    and backward, so on CPU ranks the gathered copies stayed resident: a 0.82B model peaked
    higher per rank on 2 ranks than on 1 (docs/benchmarks.md, "ZeRO-3"). The same as
    MALLOC_MMAP_THRESHOLD_ in the environment, settable after the process started.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


# ---- known noise: three messages every clean launch printed, dropped by their exact text (issue 18) ----
UNTESTED_OPTIMIZER = "**** You are using ZeRO with an untested optimizer, proceed with caution *****"
"""DeepSpeed's engine logs it at every ZeRO launch with a client optimizer, even when the config sets
zero_allow_untested_optimizer: ds_bilevel's optimizers are its own (ds_bilevel/optim.py)."""
ALL_GATHER_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
"""torch 2.13's FutureWarning, raised inside DeepSpeed's ZeRO all-gather, once per rank."""
SHM_OP_BUILT = re.compile(r"DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully")
"""DeepSpeed's print (not a log record) when a CPU rank loads its shared-memory op, once per rank."""


class _DropRecord(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def quiet_known_noise() -> None:
    """Drop the untested-optimizer log record and torch's all_gather_into_tensor deprecation, each
    by its exact message; every other warning and log line stays. Call before deepspeed is
    imported (the filter is on the "DeepSpeed" logger that deepspeed.utils.logging then reuses)."""
    import warnings

    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATION, category=FutureWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropRecord) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropRecord(UNTESTED_OPTIMIZER))


class _DropLines:
    """sys.stdout, less the whole lines that match ``pattern`` (written through line by line)."""

    def __init__(self, stream, pattern: re.Pattern):
        self.stream, self.pattern, self.pending = stream, pattern, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.pattern.fullmatch(line):
                self.stream.write(line + "\n")
        return len(text)

    def close_pending(self) -> None:
        if self.pending and not self.pattern.fullmatch(self.pending):
            self.stream.write(self.pending)
        self.pending = ""

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def dropping_lines(pattern: re.Pattern):
    """Within the block, stdout lines that match ``pattern`` in full are not printed."""
    original = sys.stdout
    sys.stdout = filtered = _DropLines(original, pattern)
    try:
        yield
    finally:
        filtered.close_pending()
        sys.stdout = original


def defer_deepspeed_compile() -> bool:
    """Let DeepSpeed's ``torch.compile`` decorations compile at their function's first call, not
    import torch's Inductor compiler at import (issue 13: 1.4 s before the first step on this CPU).

    DeepSpeed's ZeRO optimizer imports its Muon optimizer in every launch (to see whether the client
    optimizer is Muon: ``zero.utils.is_zero_supported_optimizer``), and that module decorates three
    functions with ``runtime.compiler.compile()``, which is ``torch.compile``: decorating imports
    Inductor (538 modules), though ds_bilevel's optimizers (optim.py) never call them. Here
    ``compiler.compile`` returns a decorator that applies DeepSpeed's own choice (torch.compile) on
    the first call instead, where torch.compile would compile anyway. Call before
    ``deepspeed.initialize``; idempotent. Returns whether the decorations are deferred (False: the
    Muon module was imported already, or DeepSpeed has no ``runtime.compiler.compile``)."""
    import functools

    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return False
    original = getattr(compiler, "compile", None)
    if getattr(original, "deferred", False):
        return True
    if original is None or "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return False

    def deferred_compile():
        def decorate(function):
            compiled = None

            @functools.wraps(function)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = original()(function)
                return compiled(*args, **kwargs)

            return call

        return decorate

    deferred_compile.deferred = True
    compiler.compile = deferred_compile
    return True


def init_distributed(timeout_s: int) -> None:
    """deepspeed.init_distributed with every collective bounded by ``timeout_s``.

    The timeout given to init_distributed reaches only the default group. The groups ZeRO
    creates afterwards (``dist.new_group`` without a timeout) take torch's module defaults
    (30 min for gloo, 10 min for NCCL), so a survivor of a dead peer would wait that long
    in the gradient all-reduce: set those defaults first.
    """
    from datetime import timedelta

    import deepspeed
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if "RANK" not in os.environ:  # `python launch/train.py` without a launcher: one rank, here
        import socket

        with socket.socket() as probe:  # a free port: two such runs on one machine do not collide
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    quiet_known_noise()  # idempotent; launch/train.py calls it earlier, before deepspeed is imported
    with dropping_lines(SHM_OP_BUILT):  # printed by DeepSpeed's TorchBackend on a CPU rank
        deepspeed.init_distributed(timeout=timeout)


class Heartbeat:
    """Names the ranks that stopped: each rank counts up a key in the process group's store
    every ``interval`` seconds from a daemon thread; a rank whose count no longer moves is dead
    (killed, out of memory) or frozen. The store lives in rank 0's process, so when it cannot
    be reached, rank 0 is the one that went away.

    The process group's own timeout (``collective_timeout_s``) bounds how long a collective
    waits; this only tells the survivors whom to blame.
    """

    def __init__(self, rank: int, world_size: int, interval: float = 1.0):
        import threading

        import torch.distributed as torch_dist

        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.store = torch_dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ds_bilevel-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"ds_bilevel/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # the store (rank 0) is gone: nothing left to tell
                return

    def silent_ranks(self) -> list[int]:
        """The other ranks whose heartbeat did not move over three intervals."""
        import time

        try:
            before = [self.store.add(self._key(r), 0) for r in range(self.world_size)]
            time.sleep(3 * self.interval)
            after = [self.store.add(self._key(r), 0) for r in range(self.world_size)]
        except Exception:
            return [0] if self.rank != 0 else []
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def stop(self) -> None:
        self._stop.set()


def failure_line(rank: int, error: BaseException, heartbeat: Heartbeat | None) -> str:
    """One line for a rank whose run failed: which peers went silent, and the error's first line."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    silent = heartbeat.silent_ranks() if heartbeat is not None else []
    blame = (f"rank(s) {silent} stopped responding (killed, out of memory or frozen); "
             if silent else "")
    return f"rank {rank}: {blame}{type(error).__name__}: {first} (see docs/failures.md)"


# ---- stopping on request (SIGTERM, the launcher gone): every rank saves the same step, then stops ----
STOP_KEY = "ds_bilevel/stop_at_step"
_stop = {"reason": None, "polled": False, "published": False}


class Preempted(RuntimeError):
    """The run stopped on request after saving a checkpoint at the step it reached."""


def reset_stop() -> None:
    _stop.update(reason=None, polled=False, published=False)


def request_stop(reason: str) -> bool:
    """Ask the training loop to save and stop (from a signal handler or the launcher watchdog).
    False when no training loop polls yet (set-up, evaluation before training): stop at once then."""
    if not _stop["polled"]:
        return False
    _stop["reason"] = _stop["reason"] or reason
    return True


def stop_requested(step: int, world_size: int) -> str | None:
    """Called by every rank after each step (an inner step and its outer steps): the reason to stop
    when ``step`` is the step to save and stop at, else None.

    Ranks get the signal at slightly different moments; the first to see it publishes a step in the
    process group's store (no collective, no device sync: one store round trip per step), one past
    its own: every rank is then still at or before that step, since each step holds collectives."""
    _stop["polled"] = True
    import torch.distributed as dist

    if not dist.is_initialized():
        return _stop["reason"]
    store = dist.distributed_c10d._get_default_store()
    if _stop["reason"] and not _stop["published"]:
        store.compare_set(STOP_KEY, "", f"{step + (1 if world_size > 1 else 0)}:{_stop['reason']}")
        _stop["published"] = True
    if not store.check([STOP_KEY]):
        return None
    at, _, reason = store.get(STOP_KEY).decode().partition(":")
    return reason if step >= int(at) else None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def watch_launcher(on_gone, interval: float = 1.0) -> bool:
    """Under DeepSpeed's per-node ``launch.py``: call ``on_gone()`` once when it, or the ``deepspeed``
    runner above it, ends (SIGTERM to the runner alone would leave the ranks running as orphans).
    False (nothing watched) when this rank was not started by launch.py."""
    import threading
    import time

    launcher = os.getppid()
    try:
        with open(f"/proc/{launcher}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if "deepspeed.launcher.launch" not in command and "deepspeed/launcher/launch" not in command:
        return False
    runner = _parent_of(launcher)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != launcher or _parent_of(launcher) != runner:
                on_gone()
                return

    threading.Thread(target=watch, name="ds_bilevel-launcher-watch", daemon=True).start()
    return True
