"""The run folder's own bookkeeping: what a run writes, the lock on it, what an overwrite clears,
the record of a finished run (its files' sha256), and the base model's fingerprint. The
integrity checks of weight files from outside are in integrity.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path

# ---- run folders: what a run writes, the lock on it, the record of a finished run ----------------
# Everything launch/train.py writes into output_dir (an overwrite clears these, checkpoints included,
# before the new run writes anything; other files of the folder are left alone).
RUN_OUTPUTS = ("run_config.json", "ds_config.json", "metrics.jsonl", "labels.json", "split.json",
               "adapter_model.safetensors", "training_curves.png", "summary.json", "run_manifest.json",
               "checkpoints", "monitor")
RUN_MANIFEST = "run_manifest.json"
LOCK = "ds_bilevel.lock"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: Path, value) -> None:
    """Write then rename (fsynced): readers see the old content or the new, never a part."""
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(value, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc), None when it does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"  # alive, start time unknown (no /proc)


def launch_id() -> str | None:
    """What every rank of one distributed launch shares and no other live launch has: the address
    and port of rank 0's store (MASTER_ADDR:MASTER_PORT, set by deepspeed, torchrun and accelerate).
    None for a single process."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not (addr and port):
        return None
    return f"{addr}:{port}"


def lock_holder(folder: Path) -> dict | None:
    """The lock's content when it is held by a live process other than this one, else None
    (no lock, or a stale one: its process is gone, or the pid now belongs to another process).

    Rank 0 takes the lock as soon as its own checks pass, so a rank that starts later (another
    node's, or one slowed by a busy machine) finds it: a lock of this launch's rank 0 is not
    another run's. Only the other ranks take that view; rank 0 judges every lock it did not
    write, so that a launch reusing a dead one's address never takes a live run's folder."""
    path = Path(folder) / LOCK
    try:
        holder = json.loads(path.read_text())
        pid = int(holder["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # written by a process killed while writing it: stale
    this_launch = launch_id()
    if int(os.environ.get("RANK", "0")) != 0 and this_launch is not None and holder.get("launch") == this_launch:
        return None
    if holder.get("host") != socket.gethostname():
        return holder  # cannot tell from here: held
    if pid == os.getpid():
        return None  # an earlier run in this process (tests call main() in-process)
    started = _start_time(pid)
    if started is None or started not in ("?", holder.get("start_time")):
        return None
    return holder


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command', '?')[:120]}")


def refuse_if_locked(folder: Path, setting: str = "output_dir") -> None:
    holder = lock_holder(folder)
    if holder is not None:
        raise ValueError(f"{setting}: {folder} is in use by another run ({describe_holder(holder)}); wait for it to "
                         f"end or choose another output_dir (if that run is gone, delete {Path(folder) / LOCK})")


def take_lock(folder: Path, run_id: str) -> Path:
    """Create ``folder/ds_bilevel.lock`` naming this process; a stale one (its process is gone) is
    taken over. ValueError naming the holder when a live process holds it."""
    import sys
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "run_id": run_id, "launch": launch_id(),
            "command": " ".join(sys.argv)}
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_locked(folder)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: take it over
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(mine))
        return path
    refuse_if_locked(folder)
    raise ValueError(f"output_dir: could not take {path} (another run is starting there); choose another output_dir")


def release_lock(folder: Path) -> None:
    path = Path(folder) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def clear_run_outputs(folder: Path) -> list[str]:
    """Delete what an earlier run wrote into ``folder`` (RUN_OUTPUTS, checkpoints included)."""
    import shutil

    removed = []
    for name in RUN_OUTPUTS:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_run_manifest(folder: Path, run_id: str) -> dict:
    """The record of a finished run: its id and every output file's sha256, written last. An export
    reads only files it lists, with the same bytes (check_run_folder)."""
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in (RUN_MANIFEST, LOCK) and p.name in RUN_OUTPUTS}
    manifest = {"run_id": run_id, "files": files}
    write_json_atomically(folder / RUN_MANIFEST, manifest)
    return manifest


def check_run_folder(folder: Path, reads: list[str], setting: str = "checkpoint_dir") -> None:
    """Refuse a run folder whose files do not belong together: a run is writing it (or was stopped
    before its end: its lock is left), or a file differs from what the finished run recorded."""
    folder = Path(folder)
    lock = folder / LOCK
    if lock.exists():
        holder = lock_holder(folder)
        if holder is not None:
            raise ValueError(f"{setting}: {folder} is being written by a run ({describe_holder(holder)}); export "
                             f"it when that run has finished")
        raise ValueError(f"{setting}: {folder} holds a run that did not finish (it was stopped or failed: {LOCK} "
                         f"is left); its files may come from different runs. Resume it with "
                         f"--resume_from_checkpoint latest, or train it again")
    if not (folder / RUN_MANIFEST).exists():
        return  # written by hand or by a ds_bilevel before run manifests: nothing to compare with
    try:
        manifest = json.loads((folder / RUN_MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{setting}: {folder / RUN_MANIFEST} is corrupt ({error}); train the run again") from None
    for name in reads:
        path = folder / name
        if not path.exists():
            continue
        if name not in files:
            raise ValueError(f"{setting}: {path} was not written by the run recorded in {RUN_MANIFEST} (run "
                             f"{manifest.get('run_id')}); the folder mixes runs: train it again")
        if sha256_file(path) != files[name]:
            raise ValueError(f"{setting}: {path} is not the file run {manifest.get('run_id')} wrote (its sha256 "
                             f"differs from {RUN_MANIFEST}): the folder mixes runs or the file was changed; train "
                             f"again or restore the file")


def model_fingerprint(name: str, seed: int, drawn_on: str = "cpu") -> str:
    """A cheap identity of the base model: a builtin's name, seed and draw device (its weights come from them),
    or a folder's config.json and every safetensors header and size (names, shapes, dtypes; the
    weight bytes themselves are not read)."""
    digest = hashlib.sha256()
    folder = Path(name)
    if not (folder / "config.json").is_file():
        # a builtin drawn on a GPU is another base than on the CPU (``drawn_on``: builtin.model's
        # draw_device_type); the CPU's fingerprint is the one recorded before the device was part of it
        digest.update(f"{name} seed {seed}{'' if drawn_on == 'cpu' else ' drawn on ' + drawn_on}".encode())
        return digest.hexdigest()[:16]
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            digest.update(path.name.encode() + str(path.stat().st_size).encode() + handle.read(min(length, 1 << 26)))
    return digest.hexdigest()[:16]
