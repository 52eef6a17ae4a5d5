"""The life of a training run: setup, train, save, cleanup (torchtune's recipe shape).

Everything here runs after the launcher has validated the settings; the first
distributed call is ``deepspeed.init_distributed`` in ``setup``. What the run trains on is
built by preparation.py, the steps are schedule.run_steps over the engine, and what a run
measures and writes is in outputs.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ds_bilevel import checkpoint
from ds_bilevel.adapters.inject import layer_kinds
from ds_bilevel.builtin.model import draw_device_type, is_builtin
from ds_bilevel.config import RunConfig, config_to_dict
from ds_bilevel.distributed import Heartbeat, Preempted, defer_deepspeed_compile, init_distributed, stop_requested
from ds_bilevel.ds_config import DeepSpeedSettings
from ds_bilevel.engine import BilevelEngine
from ds_bilevel.evaluation import evaluate
from ds_bilevel.levels import Level, StepKind
from ds_bilevel.outputs import (
    NonFiniteError,
    base_checksum,
    change_norm,
    check_finite,
    level_values,
    on_host,
    peak_memory_per_rank,
    relative_change,
    trim_metrics,
    write_adapters,
)
from ds_bilevel.phases import Phases
from ds_bilevel.plot import plot_metrics
from ds_bilevel.preparation import batch_sources, prepare
from ds_bilevel.schedule import events, run_steps

Loss = torch.Tensor | float | None


@dataclass
class Progress:
    """Where a run stands; a checkpoint's client state holds it (``client_state``), so a resumed
    run starts from it. Losses stay device tensors between logged steps (issue 13)."""

    position: int = 0
    """Steps of the schedule done (schedule.events)."""
    inner_done: int = 0
    """Inner steps done, retraining included: the step number of logs and checkpoints."""
    before: dict | None = None
    """The evaluation before training (None: eval_before_training false)."""
    first_loss: Loss = None
    """The first inner step's loss."""
    outer_loss: Loss = None
    """The last outer step's loss (None once the outer level is frozen for retraining)."""
    last_loss: Loss = None
    """The last inner step's loss."""

    def on_host(self) -> None:
        """Read the losses once (a host sync), at a logged step."""
        self.last_loss, self.outer_loss, self.first_loss = (
            on_host(self.last_loss), on_host(self.outer_loss), on_host(self.first_loss))

    def client_state(self) -> dict:
        return {key: on_host(value) for key, value in asdict(self).items()}


class TrainingRecipe:
    def __init__(self, run: RunConfig, ds_config: dict, phases: Phases | None = None):
        self.run, self.ds_config = run, ds_config
        self.ds_settings = DeepSpeedSettings.read(ds_config)  # read once, for the model and the engine
        self.output_dir = Path(run.output_dir)
        self.phases = phases or Phases()

    # ---- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed.comm as dist

        run = self.run
        # Every collective fails after collective_timeout_s instead of waiting for a dead peer
        # forever; the heartbeat then names the peer (docs/failures.md).
        init_distributed(run.collective_timeout_s)
        self.phases.mark("init_distributed")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.heartbeat = Heartbeat(self.rank, self.world_size) if self.world_size > 1 else None
        if self.rank != 0:
            import datasets

            datasets.disable_progress_bars()
        data = prepare(run, self.ds_settings, self.phases)
        # Which layers were adapted, by kind: all-linear picks them from the model (adapters/inject.py).
        self.adapted_layers = {"count": len(data.adapted), "kinds": layer_kinds(data.adapted)}
        if self.rank == 0:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in self.adapted_layers["kinds"].items())
            print(f"adapters: {run.adapter.method} on {len(data.adapted)} layers ({kinds})", flush=True)
        self.tokenizer, self.eval_set = data.tokenizer, data.eval_set
        defer_deepspeed_compile()  # DeepSpeed's ZeRO optimizer would import torch's Inductor (1.4 s)
        self.engine = BilevelEngine(data.model, run, self.ds_settings)
        self.phases.mark("deepspeed_initialize")
        self.initial = level_values(self.engine.module)
        self.sources = batch_sources(run, self.engine.mode, data, self.rank, self.world_size)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.json").write_text(json.dumps(config_to_dict(run), indent=2))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            if not run.resume_from_checkpoint:  # on resume, _resume opens it once trimmed to the checkpoint's step
                self.metrics_file = (self.output_dir / "metrics.jsonl").open("w")
            if data.labels is not None:  # class id -> name, for reading predictions and for export
                (self.output_dir / "labels.json").write_text(json.dumps(data.labels))
            if StepKind.OUTER in self.sources and not run.data.validation_file:  # the D1/D2 split, for audits
                split = {"d1": self.sources[StepKind.INNER].indices, "d2": self.sources[StepKind.OUTER].indices}
                (self.output_dir / "split.json").write_text(json.dumps(split))
        self.phases.mark("setup_rest")

    # ---- train -----------------------------------------------------------------------------

    def _log(self, row: dict) -> None:
        """A metrics.jsonl line, and the same numbers to DeepSpeed's monitors (TensorBoard, CSV,
        W&B, as enabled in the DeepSpeed config)."""
        if self.rank == 0:
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
            events = [(f"ds_bilevel/{key}", value, row["step"]) for key, value in row.items()
                      if key != "step" and isinstance(value, int | float)]
            self.engine.write_monitor_events(events)

    def _evaluate(self, step: int) -> dict:
        metrics = evaluate(self.engine, self.eval_set, self.tokenizer.pad_token_id, self.run.eval_batch_size)
        self._log({"step": step, **metrics})
        return metrics

    def train(self) -> dict:
        from tqdm.auto import tqdm

        run, bilevel = self.run, self.run.bilevel
        schedule = list(events(self.engine.mode, run.max_steps, bilevel.unroll_steps, bilevel.outer_steps,
                               bilevel.retrain_steps))
        total = sum(kind != StepKind.OUTER for kind, _ in schedule)  # inner steps, retraining included
        if run.resume_from_checkpoint:
            state = self._resume(total)
        else:  # the evaluation before training, unless told to skip it (its phase is then 0 s)
            state = Progress(before=self._evaluate(0) if run.eval_before_training else None)
        self.phases.mark("resume" if run.resume_from_checkpoint else "eval_before")
        if state.before is not None and not math.isfinite(state.before["eval_loss"]):
            # NaN/inf base weights make every loss non-finite: stop before the first step, not at the end
            raise NonFiniteError(f"the evaluation before training gave a non-finite loss (eval_loss "
                                 f"{state.before['eval_loss']}); nothing was trained or written. A NaN or infinite "
                                 f"base weight, or settings such as adapter.alpha, make every loss non-finite "
                                 f"(docs/failures.md)")
        first_position = state.position
        bar = tqdm(total=total, initial=state.inner_done, desc=f"train {run.adapter.method}",
                   disable=self.rank != 0, dynamic_ncols=True)
        # A run resumed from its last checkpoint may have no step left: it reports the saved loss.
        tokens_seen, steps_now, start = 0, 0, time.perf_counter()
        for step in run_steps(self.engine, self.sources, schedule, start=state.position):
            tokens_seen += step.batch.tokens
            state.position = step.position + 1
            if step.position == first_position:  # one wait, once: the first step's true end
                self._mark_first_step()
            if step.kind == StepKind.RETRAIN and step.index == 0:
                state.outer_loss = None  # the outer level is frozen from here on
            if step.kind == StepKind.OUTER:
                state.outer_loss = step.loss
            else:
                state.last_loss = step.loss
                state.inner_done = step.index + 1 + (run.max_steps if step.kind == StepKind.RETRAIN else 0)
                state.first_loss = state.first_loss if state.first_loss is not None else step.loss
                bar.update(1)
                steps_now += 1
            if step.position + 1 < len(schedule) and schedule[step.position + 1][0] == StepKind.OUTER:
                continue  # an inner step and its outer steps form one unit: log and save after both
            self._after_unit(state, total, tokens_seen, time.perf_counter() - start, bar)
        bar.close()
        train_time = time.perf_counter() - start
        self.phases.mark("training_after_first_step")
        after = self._evaluate(total)
        self.phases.mark("eval_after")
        before = state.before or dict.fromkeys(after)  # not evaluated: every *_before value null
        return {"eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
                # exact_match_before/after (token labels) or accuracy_before/after (a classifier)
                **{f"{key.removeprefix('eval_')}_{when}": value for when, metrics in (("before", before),
                   ("after", after)) for key, value in metrics.items() if key != "eval_loss"},
                "train_loss_first": state.first_loss, "train_loss_last": state.last_loss,
                "tokens_per_s": tokens_seen / train_time, "train_time_s": train_time,
                # the run's inner steps, and those this launch took (fewer after a resume)
                "steps": total, "steps_this_launch": steps_now, "world_size": self.world_size,
                "nonfinite_steps": self.engine.nonfinite_steps}

    def _mark_first_step(self) -> None:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        self.phases.mark("first_step")
        self.phases.seconds["start_to_first_step"] = self.phases.since_start()
        self.phases.seconds["first_step_done_unix_s"] = round(time.time(), 3)  # vs a launcher's clock

    def _after_unit(self, state: Progress, total: int, tokens_seen: int, elapsed: float, bar) -> None:
        """Log, evaluate and save, as due, after an inner step and its outer steps."""
        run, step = self.run, state.inner_done
        if step % run.log_steps == 0 or step == total:
            # Losses stay device tensors between logged steps: reading one makes the host wait
            # for the device, so it happens once per logged step (issue 13).
            state.on_host()
            nonfinite = self.engine.nonfinite_steps
            bar.set_postfix(loss=f"{state.last_loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}",
                            **({"outer": f"{state.outer_loss:.3f}"} if state.outer_loss else {}),
                            **({"skipped": nonfinite} if nonfinite else {}))
            self._log({"step": step, "train_loss": state.last_loss, "outer_loss": state.outer_loss,
                       "lr": self.engine.scheduler.get_lr(Level.INNER),
                       "outer_lr": self.engine.scheduler.get_lr(Level.OUTER),
                       "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed, "nonfinite_steps": nonfinite})
        if (run.eval_steps and step % run.eval_steps == 0 or step == run.max_steps) and step < total:
            self._evaluate(step)  # and at the end of the bi-level phase when retraining follows
        stop = stop_requested(step, self.world_size)  # SIGTERM / launcher gone: save this step, stop (issue 17)
        if stop or run.save_steps and (step % run.save_steps == 0 or step == total):
            # The last step too (as HF Trainer): a finished run can be resumed with a larger
            # max_steps, and a crash in the final save or export loses nothing.
            self._save_checkpoint(state)
        if stop:
            saved = self.output_dir / "checkpoints" / f"step{step}"
            raise Preempted(f"stopped by {stop} at step {step}: saved {saved}; resume with "
                            f"--resume_from_checkpoint latest")

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, state: Progress) -> None:
        """DeepSpeed's checkpoint (collective) with the progress and the engine's state; each rank's RNG
        state goes into a file of its own (checkpoint.save)."""
        check_finite(level_values(self.engine.module))
        client = {**state.client_state(), **self.engine.state_dict()}
        # The manifest records the schedule, so that a resume into another one is refused before launch.
        schedule = {"schedule": checkpoint.schedule_fields(self.engine.mode, self.run),
                    "position": state.position, "inner_done": state.inner_done}
        self.engine.save_checkpoint(self.output_dir, checkpoint.tag(state.inner_done), {"ds_bilevel": client},
                                    self.rank, manifest_extra=schedule)

    def _resume(self, total: int) -> Progress:
        load_dir, tag = checkpoint.resolve(self.run.resume_from_checkpoint, self.output_dir)
        state = self.engine.load_checkpoint(load_dir, tag)["ds_bilevel"]
        self.engine.load_state_dict({key: state.pop(key) for key in ("scheduler", "nonfinite")}, state["inner_done"])
        checkpoint.set_rng_state(checkpoint.saved_rng_state(load_dir / tag, self.rank, state))
        state.pop("rng", None)  # rank 0's, in a checkpoint saved before each rank had its own file
        if self.rank == 0:
            # The lines a stopped launch wrote after this checkpoint are written again from here on:
            # the file then holds the lines of a run that never stopped (issue 18).
            metrics = self.output_dir / "metrics.jsonl"
            # A launch resumed at the run's end trains nothing and writes only the final evaluation again.
            trim_metrics(metrics, state["inner_done"], at_the_end=state["inner_done"] == total)
            self.metrics_file = metrics.open("a")
        return Progress(**state)

    # ---- save ------------------------------------------------------------------------------
    def save(self, summary: dict) -> dict:
        """Write the adapters (fp32 masters, safetensors) and the summary. Collective."""
        module = self.engine.module
        final = check_finite(level_values(module))
        # How far each level moved: a frozen outer level (the bf16 magnitude stall) shows as 0.
        summary["change_norm"] = {level.value: change_norm(self.initial[level], final[level]) for level in Level}
        summary["relative_change"] = {level.value: relative_change(self.initial[level], final[level])
                                      for level in Level}
        if self.run.checksum_base:
            summary["base_sha256"] = base_checksum(module)
        summary["peak_memory_gb_per_rank"] = peak_memory_per_rank()
        summary["adapted_layers"] = self.adapted_layers
        self.phases.mark("save")
        # Where a launch spends its time (seconds, in order): the start-up as much as the training.
        summary["phases"] = dict(self.phases.seconds)
        if self.rank == 0:
            drawn_on = draw_device_type() if is_builtin(self.run.model_name_or_path) else None
            write_adapters(self.output_dir / "adapter_model.safetensors", final, self.run.adapter.method, drawn_on)
            summary["output_dir"] = str(self.output_dir.resolve())
            self.metrics_file.flush()
            summary["plot"] = str(plot_metrics(self.output_dir / "metrics.jsonl",
                                               self.output_dir / "training_curves.png",
                                               f"{self.run.adapter.method} on {self.run.model_name_or_path}"))
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def release(self) -> None:
        """Free the engine (``BilevelEngine.close``), after a run or a failure; a no-op before setup made it."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def cleanup(self) -> None:
        import deepspeed.comm as dist

        if self.rank == 0:
            self.metrics_file.close()
        dist.barrier()
        if self.heartbeat is not None:
            self.heartbeat.stop()
