"""Checkpoints through DeepSpeed's save/load, plus the state DeepSpeed does not know about.

DeepSpeed saves the module's trainable parameters (``exclude_frozen_parameters``: the
frozen base is not written again at every checkpoint), both levels' fp32 masters and Adam
moments (one optimizer, level-tagged groups) at every ZeRO stage. The client state adds
what makes a resume exact: the position in the schedule (the batch order is a pure
function of it), both levels' learning-rate schedules, the RNG states, the D1/D2 split and
the losses the summary needs.

Saving is atomic (``save``): DeepSpeed writes into ``<tag>.partial``; only when every rank
has finished does rank 0 write a manifest of the files (size, sha256) and of the run's facts
(``run_facts``: what a resume must keep), rename the folder to
``<tag>`` and replace ``latest``. A job killed at any moment leaves ``latest`` on a complete
checkpoint; ``verify`` refuses a truncated, damaged or unfinished one and ``check_fits`` one saved by
a run with other settings, each with a one-line error, before launch. The
checkpoint folder must be on a filesystem all nodes share (as DeepSpeed's ``latest`` assumes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

from ds_bilevel.files import sha256_file

CHECKPOINT_DIR = "checkpoints"
PARTIAL = ".partial"
REPLACED = ".replaced"
RNG_FILE = "rng_state_{rank}.pt"
MANIFEST = "ds_bilevel_manifest.json"
# What a checkpoint must share with a run that resumes it (``run_facts``): set by launch/train.py
# before launch, written into every manifest, checked by ``check_fits`` before a resume launches.
run_facts_of_this_run: dict = {}


def write_atomically(path: Path, text: str) -> None:
    """Write then rename: readers see the old content or the new, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(engine, output_dir: Path, tag_name: str, client_state: dict, rank: int,
         manifest_extra: dict | None = None) -> Path:
    """DeepSpeed's save_checkpoint (collective), made atomic as the module docstring says.

    ``manifest_extra`` goes into the manifest too: small facts the launcher checks before any
    process group starts (the schedule the checkpoint was saved in, ``check_schedule``)."""
    import deepspeed.comm as dist

    folder = output_dir / CHECKPOINT_DIR
    partial, final = folder / (tag_name + PARTIAL), folder / tag_name
    if rank == 0:
        finish_interrupted_saves(folder)
    dist.barrier()
    with disk_full_named(partial):
        # Each rank's own RNG state, in a file of its own (as HF Trainer's rng_state_<rank>): DeepSpeed
        # writes the client state from rank 0 only, and ranks' generators differ (a CUDA dropout
        # advances its generator by the size of the rank's batch).
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), partial / RNG_FILE.format(rank=rank))
        engine.save_checkpoint(str(folder), tag=partial.name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)  # ends with a barrier: every rank's files are written
    with disk_full_named(partial):  # the manifest and the renames, rank 0
        if rank == 0:
            files = {str(f.relative_to(partial)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(partial.rglob("*")) if f.is_file()}
            manifest = {"tag": tag_name, "files": files, "run": run_facts_of_this_run, **(manifest_extra or {})}
            write_atomically(partial / MANIFEST, json.dumps(manifest))
            # The same step saved again (a resume from an older checkpoint): the old folder is moved
            # aside, not deleted, until the new one is in place, so a kill between the two renames
            # leaves a complete step<N> (and ``latest`` on it) rather than a ``latest`` naming nothing.
            replaced = folder / (tag_name + REPLACED)
            if replaced.exists():
                shutil.rmtree(replaced)
            if final.exists():
                os.replace(final, replaced)
            os.replace(partial, final)
            write_atomically(folder / "latest", tag_name)
            if replaced.exists():
                shutil.rmtree(replaced)
    dist.barrier()
    return final


def finish_interrupted_saves(folder: Path) -> None:
    """Put right what a job killed inside ``save`` left in ``folder`` (rank 0, before the next save):
    a complete ``<tag>.partial`` (its manifest is written last) whose rename was cut off becomes
    ``<tag>``, an unfinished one is deleted, and ``<tag>.replaced`` (the copy moved aside) goes once
    ``<tag>`` exists. Without this a run resumed from a ``.partial`` (``resolve``) and saving other
    steps kept both copies of the interrupted step on disk for good."""
    for partial in sorted(folder.glob("*" + PARTIAL)):
        final = folder / partial.name[: -len(PARTIAL)]
        if (partial / MANIFEST).is_file() and not final.exists():
            os.replace(partial, final)
        else:
            shutil.rmtree(partial)
    for replaced in sorted(folder.glob("*" + REPLACED)):
        final = folder / replaced.name[: -len(REPLACED)]
        if final.exists():
            shutil.rmtree(replaced)
        else:  # cannot follow from ``save``'s order; kept as the step's only copy
            os.replace(replaced, final)


class DiskFull(OSError):
    """A checkpoint save ran out of space: the line names the folder and the space left."""


@contextlib.contextmanager
def disk_full_named(folder: Path):
    """torch.save reports a full disk as "unexpected pos ..." (its zip writer), and the other ranks
    then blame this one for dying: say "no space left on device" and where instead."""
    import errno

    try:
        yield
    except (OSError, RuntimeError) as error:
        text = str(error)
        if not (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
                or "unexpected pos" in text):
            raise
        try:
            free = f"{shutil.disk_usage(folder.parent).free / 2**20:.0f} MiB free there now"
        except OSError:
            free = "free space unknown"
        raise DiskFull(errno.ENOSPC, f"no space left on device while saving checkpoint {folder} ({free}); "
                                     f"free space or move output_dir, then resume from the last complete "
                                     f"checkpoint (--resume_from_checkpoint latest)") from None


def read_manifest(folder: Path) -> dict:
    """The manifest of the checkpoint in ``folder``: a JSON object with a "files" object."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"resume_from_checkpoint: {folder} is incomplete (no {MANIFEST}: its save was interrupted "
                         f"or it was not written by ds_bilevel); resume from an earlier checkpoint")
    try:
        values = json.loads(manifest.read_text())
        if not isinstance(values, dict) or not isinstance(values.get("files"), dict):
            raise ValueError(f"a JSON {type(values).__name__} without a \"files\" object")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"resume_from_checkpoint: {manifest} is corrupt ({error}); resume from an earlier "
                         f"checkpoint") from None
    return values


def verify(folder: Path, checksums: bool = True) -> None:
    """Refuse a checkpoint that an interrupted save, a truncated copy or damaged bytes left
    unusable: every file of the manifest with its size and, with ``checksums``, its sha256."""
    for name, recorded in read_manifest(folder)["files"].items():
        old_style = not isinstance(recorded, dict)  # sizes only, before sha256 was recorded
        size, digest = (recorded, None) if old_style else (recorded.get("size"), recorded.get("sha256"))
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise ValueError(f"resume_from_checkpoint: {path} is truncated or missing ({actual} bytes, "
                             f"expected {size}); resume from an earlier checkpoint")
        if path.suffix == ".pt" and not zipfile.is_zipfile(path):
            raise ValueError(f"resume_from_checkpoint: {path} is not a readable torch file (corrupt)")
        if checksums and digest and sha256_file(path) != digest:
            raise ValueError(f"resume_from_checkpoint: {path} is damaged (its sha256 differs from the one recorded "
                             f"when it was saved); resume from an earlier checkpoint or copy it again")


# What each fact of run_facts is called in an error line, and what a resume must keep.
FACT_NAMES = {"zero_stage": "zero_optimization.stage", "world_size": "world size", "bf16": "bf16.enabled",
              "model": "base model (model_name_or_path, seed)", "global_batch_size": "global batch size "
              "(micro_batch_size x gradient_accumulation_steps x world size)", "dataset": "dataset (its name and "
              "bytes)", "split_ratio": "bilevel.split_ratio"}


def dataset_identity(name: str) -> str:
    """A data file's name and sha256 (a file edited between launches is another dataset); a builtin's,
    a folder's or a hub dataset's name."""
    from ds_bilevel.files import sha256_file

    path = Path(name)
    return f"{name} sha256 {sha256_file(path)[:16]}" if path.is_file() else name


def run_facts(run, ds_config: dict, world_size: int) -> dict:
    """What a checkpoint must share with the run that resumes it (saved in its manifest): the
    adapter settings (method, ranks, targets, ...), ZeRO stage, precision, world size, the base
    model's fingerprint (files.model_fingerprint), and what decides which examples each step of
    the schedule reads: the data and its settings, the seed, the D1/D2 split and the global batch
    (the batch order is a function of the step; with another of these the steps after the
    checkpoint would read other examples, some again, some never). The learning rate and the
    hypergradient's settings may change."""
    import dataclasses

    from ds_bilevel.adapters.registry import method
    from ds_bilevel.builtin.model import draw_device_type
    from ds_bilevel.ds_config import zero_stage
    from ds_bilevel.files import model_fingerprint
    from ds_bilevel.levels import TrainingMode

    facts = {"adapter": dataclasses.asdict(run.adapter), "zero_stage": zero_stage(ds_config),
             "bf16": bool(ds_config.get("bf16", {}).get("enabled")), "world_size": world_size,
             "model": model_fingerprint(run.model_name_or_path, run.seed, draw_device_type()),
             "dataset": dataset_identity(run.dataset), "data": dataclasses.asdict(run.data), "seed": run.seed,
             "global_batch_size": run.global_batch_size(world_size)}
    if method(run.adapter.method).training_mode is TrainingMode.BILEVEL:  # the only mode with a D1/D2 split
        facts["split_ratio"] = run.bilevel.split_ratio
    return facts


def check_fits(folder: Path, facts: dict) -> None:
    """Refuse to resume the checkpoint in ``folder`` into a run that differs in one of run_facts:
    one line listing every difference. Facts a checkpoint was saved without (an older version):
    not checked."""
    saved = read_manifest(folder).get("run") or {}
    differences = []
    for key, wanted in facts.items():
        if key not in saved or saved[key] == wanted:
            continue
        if isinstance(wanted, dict) and isinstance(saved[key], dict):  # adapter.*, data.*
            differences += [f"{key}.{name} {saved[key][name]!r} (this run: {value!r})"
                            for name, value in wanted.items() if name in saved[key] and saved[key][name] != value]
        elif key == "model":
            differences.append(f"the base model (fingerprint {saved[key]}; this run's {wanted}: another "
                               f"model_name_or_path, seed or weight files)")
        else:
            differences.append(f"{FACT_NAMES.get(key, key)} {saved[key]!r} (this run: {wanted!r})")
    if differences:
        raise ValueError(f"resume_from_checkpoint: {folder} was saved by a run with {'; '.join(differences)}; "
                         f"resume with the checkpoint's settings, or start a new run in another output_dir "
                         f"(nothing was changed)")


def schedule_fields(mode: str, run) -> dict:
    """The settings that decide the schedule (schedule.events), as a checkpoint records them."""
    bilevel = run.bilevel
    return {"mode": mode, "max_steps": run.max_steps, "unroll_steps": bilevel.unroll_steps,
            "outer_steps": bilevel.outer_steps, "retrain_steps": bilevel.retrain_steps}


def check_schedule(folder: Path, mode: str, run) -> None:
    """Refuse to resume the checkpoint in ``folder`` into a schedule that differs from the one it
    was saved in before its position: the steps already taken must be the new run's first ones.

    A larger max_steps continues a run (its first steps are the same); a smaller one than the
    checkpoint's step, another method or unroll/outer steps, or a longer bi-level phase in front
    of a retraining phase already under way would not. Checkpoints written before the manifest
    held the schedule are not checked."""
    from ds_bilevel.schedule import events

    manifest = read_manifest(folder)
    saved, position = manifest.get("schedule"), manifest.get("position")
    if saved is None or position is None:
        return
    wanted = schedule_fields(mode, run)
    old = list(events(**saved))[:position]
    new = list(events(**wanted))[:position]
    if old != new:
        done = manifest.get("inner_done", "?")
        changed = ", ".join(f"{key} {saved[key]} -> {wanted[key]}" for key in saved if saved[key] != wanted[key])
        if isinstance(done, int) and done > saved["max_steps"]:  # inside the retraining phase
            allowed = (f"the same method, unroll_steps and outer_steps, and max_steps {saved['max_steps']} (the "
                       f"retraining phase had begun; a larger bilevel.retrain_steps trains further)")
        else:
            allowed = (f"the same method, unroll_steps and outer_steps, and max_steps >= {done} "
                       f"(a larger one trains further)")
        raise ValueError(f"resume_from_checkpoint: {folder} holds {done} steps of a run whose schedule this run "
                         f"would not follow ({changed}); allowed: {allowed}")


def tag(inner_steps: int) -> str:
    return f"step{inner_steps}"


def resolve(resume_from: str, output_dir: Path, checksums: bool = False) -> tuple[Path, str]:
    """(DeepSpeed load_dir, tag) for ``latest`` or a checkpoint folder (a tag folder or the
    folder holding DeepSpeed's ``latest`` file), verified (sha256 too with ``checksums``)."""
    folder = output_dir / CHECKPOINT_DIR if resume_from == "latest" else Path(resume_from)
    if (folder / "latest").is_file():
        tag_name = (folder / "latest").read_text().strip()
        if not (folder / tag_name).is_dir() and (folder / (tag_name + PARTIAL) / MANIFEST).is_file():
            # killed between the two renames of a step saved again (``save``): the new checkpoint is
            # complete (its manifest is written last) and only its rename is missing
            tag_name += PARTIAL
        verify(folder / tag_name, checksums)
        return folder, tag_name
    if folder.is_dir() and any(folder.glob("*model_states.pt")):
        verify(folder, checksums)
        return folder.parent, folder.name
    raise ValueError(f"resume_from_checkpoint: {resume_from!r} is not a checkpoint "
                     f"(no 'latest' file in {folder} and no DeepSpeed model states)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def saved_rng_state(folder: Path, rank: int, client_state: dict) -> dict:
    """This rank's RNG state in the checkpoint ``folder``: its own file, or for a checkpoint saved
    before there was one, the client state's (rank 0's, which every rank then took)."""
    path = folder / RNG_FILE.format(rank=rank)
    if path.is_file():
        return torch.load(path, weights_only=True)
    return client_state["rng"]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
