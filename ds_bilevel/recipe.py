"""The life of a training run: setup, train, save, cleanup (torchtune's recipe shape).

Everything here runs after the launcher has validated the settings; the first
distributed call is ``deepspeed.init_distributed`` in ``setup``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_bilevel import checkpoint
from ds_bilevel.adapters import inject_adapters
from ds_bilevel.adapters.inject import layer_kinds, named_base_parameters
from ds_bilevel.config import RunConfig, config_to_dict
from ds_bilevel.data import load_records, load_validation, tokenize
from ds_bilevel.distributed import Heartbeat, init_distributed
from ds_bilevel.engine import BilevelEngine, NonFiniteError
from ds_bilevel.evaluation import evaluate
from ds_bilevel.heads import head_names, train_head
from ds_bilevel.kernels import apply_kernels
from ds_bilevel.levels import Level, named_level_parameters
from ds_bilevel.models import encoder_labels, load_model, load_tokenizer
from ds_bilevel.phases import Phases
from ds_bilevel.plot import plot_metrics
from ds_bilevel.schedule import BatchSource, events, split_d1_d2
from ds_bilevel.zero_access import gathered, master_value


def base_checksum(model: torch.nn.Module) -> str:
    """sha256 over the frozen base's names and bytes, gathered one tensor at a time."""
    digest = hashlib.sha256()
    for name, param in named_base_parameters(model):
        with gathered([param]):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with a frozen base and
    under ZeRO-3 from DeepSpeed 0.19.3; reentrant would need enable_input_require_grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass
class Prepared:
    """What a run trains on, the same on every rank and in the plain-PyTorch reference."""

    tokenizer: object
    train_set: object
    eval_set: object
    d2_set: object | None  # an explicit D2 file, tokenised (None: D2 is a share of train_set)
    model: torch.nn.Module
    labels: list[str] | None = None  # an encoder's class names, index = class id (None: a causal LM)
    adapted: list[str] | None = None  # the adapted layers' names, in model order


def prepare(run: RunConfig, ds_config: dict | None = None, phases: Phases | None = None) -> Prepared:
    mark = phases.mark if phases is not None else (lambda name: None)
    torch.manual_seed(run.seed)
    tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
    train, evaluation = load_records(run.dataset, run.data, run.seed)
    d2 = load_validation(run.data)
    labels = encoder_labels(run.model_name_or_path, run.trust_remote_code, run.data, train, evaluation, d2)
    train_set, eval_set, d2_set = (tokenize(records, tokenizer, run.data, labels) if records is not None else None
                                   for records in (train, evaluation, d2))
    mark("tokenizer_and_data")
    model = load_model(run.model_name_or_path, len(tokenizer), run.seed, run.trust_remote_code, ds_config, labels)
    model.config.use_cache = False
    # Fused kernels replace modules of the base (norms, RoPE, MLP): before the adapters wrap it.
    apply_kernels(model, run.use_liger_kernel, run.torch_compile)
    if run.gradient_checkpointing:
        enable_activation_checkpointing(model)
    # The frozen embeddings' output does not require grad: ZeRO-3 then misses the first adapted
    # layers' pre-backward hooks and their backward finds released (empty) weights. Making it
    # require grad costs one (B, T, H) gradient (PEFT does the same for checkpointing).
    model.enable_input_require_grads()
    torch.manual_seed(run.seed)  # the same adapter init on every rank
    # An encoder's head is trained whole at the inner level, never wrapped by an adapter (heads.py).
    adapted = inject_adapters(model, run.adapter, exclude=head_names(model) if labels is not None else ())
    if labels is not None:
        train_head(model)
    mark("model_and_adapters")
    return Prepared(tokenizer, train_set, eval_set, d2_set, model, labels, adapted)


def batch_sources(run: RunConfig, mode: str, data: Prepared, rank: int, world_size: int) -> dict[str, BatchSource]:
    """Where each kind of step takes its batches: D1 and D2 for bi-level methods (a seeded
    split of the training set, or all of it and the explicit validation file), the whole
    training set otherwise; the retraining phase reads D1 and D2 together."""
    global_batch, pad_id = run.global_batch_size(world_size), data.tokenizer.pad_token_id

    def source(dataset, indices: list[int], seed: int) -> BatchSource:
        return BatchSource(dataset, indices, global_batch, run.micro_batch_size, rank, world_size, seed, pad_id)

    everything = list(range(len(data.train_set)))
    if mode != "bilevel":
        return {"inner": source(data.train_set, everything, run.seed),
                "sharpness": source(data.train_set, everything, run.seed)}
    if data.d2_set is not None:
        from datasets import concatenate_datasets

        both = concatenate_datasets([data.train_set, data.d2_set])
        return {"inner": source(data.train_set, everything, run.seed),
                "outer": source(data.d2_set, list(range(len(data.d2_set))), run.seed + 1),
                "retrain": source(both, list(range(len(both))), run.seed + 2)}
    d1, d2 = split_d1_d2(len(everything), run.bilevel.split_ratio, run.seed)
    return {"inner": source(data.train_set, d1, run.seed), "outer": source(data.train_set, d2, run.seed + 1),
            "retrain": source(data.train_set, everything, run.seed + 2)}


def peak_memory_per_rank() -> list[float]:
    """Each rank's peak memory in GiB: accelerator memory allocated on a GPU, else the process's
    peak resident set (ru_maxrss). Collective."""
    import resource

    import deepspeed.comm as dist

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        peak, device = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, torch.device("cpu")  # KiB
    values = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([peak], dtype=torch.float64, device=device))
    return [round(v.item(), 3) for v in values]


def on_host(value):
    """A device scalar as a Python float (a host sync); anything else as it is."""
    return float(value) if isinstance(value, torch.Tensor) else value


class TrainingRecipe:
    def __init__(self, run: RunConfig, ds_config: dict, phases: Phases | None = None):
        self.run, self.ds_config = run, ds_config
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
        data = prepare(run, self.ds_config, self.phases)
        # Which layers were adapted, by kind: all-linear picks them from the model (adapters/inject.py).
        self.adapted_layers = {"count": len(data.adapted), "kinds": layer_kinds(data.adapted)}
        if self.rank == 0:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in self.adapted_layers["kinds"].items())
            print(f"adapters: {run.adapter.method} on {len(data.adapted)} layers ({kinds})", flush=True)
        self.tokenizer, self.eval_set = data.tokenizer, data.eval_set
        self.engine = BilevelEngine(data.model, run, self.ds_config)
        self.phases.mark("deepspeed_initialize")
        self.initial = self._level_values()
        self.sources = batch_sources(run, self.engine.mode, data, self.rank, self.world_size)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.json").write_text(json.dumps(config_to_dict(run), indent=2))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            self.metrics_file = (self.output_dir / "metrics.jsonl").open("a" if run.resume_from_checkpoint else "w")
            if data.labels is not None:  # class id -> name, for reading predictions and for export
                (self.output_dir / "labels.json").write_text(json.dumps(data.labels))
            if "outer" in self.sources and not run.data.validation_file:  # the D1/D2 split, for audits
                split = {"d1": self.sources["inner"].indices, "d2": self.sources["outer"].indices}
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
            self.engine.engine.monitor.write_events(events)

    def _evaluate(self, step: int) -> dict:
        metrics = evaluate(self.engine, self.eval_set, self.tokenizer.pad_token_id, self.run.eval_batch_size)
        self._log({"step": step, **metrics})
        return metrics

    def train(self) -> dict:
        from tqdm.auto import tqdm

        run, bilevel = self.run, self.run.bilevel
        schedule = list(events(self.engine.mode, run.max_steps, bilevel.unroll_steps, bilevel.outer_steps,
                               bilevel.retrain_steps))
        total = sum(kind != "outer" for kind, _ in schedule)  # inner steps, retraining included
        state = self._resume() if run.resume_from_checkpoint else {
            "position": 0, "inner_done": 0, "before": self._evaluate(0), "first_loss": None, "outer_loss": None}
        self.phases.mark("resume" if run.resume_from_checkpoint else "eval_before")
        first_position = state["position"]
        progress = tqdm(total=total, initial=state["inner_done"], desc=f"train {run.adapter.method}",
                        disable=self.rank != 0, dynamic_ncols=True)
        # A run resumed from its last checkpoint may have no step left: it reports the saved loss.
        tokens_seen, start, loss = 0, time.perf_counter(), state.get("last_loss")
        for position in range(state["position"], len(schedule)):
            kind, index = schedule[position]
            if kind == "retrain" and index == 0:
                self.engine.start_retraining()
                state["outer_loss"] = None  # the outer level is frozen from here on
            batch = self.sources[kind].batch(index)
            step_loss = self.engine.step(kind, batch)
            tokens_seen += batch.tokens
            if position == first_position:  # one wait, once: the first step's true end
                from deepspeed.accelerator import get_accelerator

                get_accelerator().synchronize()
                self.phases.mark("first_step")
                self.phases.seconds["start_to_first_step"] = self.phases.since_start()
                self.phases.seconds["first_step_done_unix_s"] = round(time.time(), 3)  # vs a launcher's clock
            if kind == "outer":
                state["outer_loss"] = step_loss
            else:
                loss, state["inner_done"] = step_loss, index + 1 + (run.max_steps if kind == "retrain" else 0)
                state["first_loss"] = state["first_loss"] if state["first_loss"] is not None else loss
                progress.update(1)
            if position + 1 < len(schedule) and schedule[position + 1][0] == "outer":
                continue  # an inner step and its outer steps form one unit: log and save after both
            elapsed = time.perf_counter() - start
            step = state["inner_done"]
            if step % run.log_steps == 0 or step == total:
                # Losses stay device tensors between logged steps: reading one makes the host wait
                # for the device, so it happens once per logged step (issue 13).
                loss, state["outer_loss"], state["first_loss"] = (
                    on_host(loss), on_host(state["outer_loss"]), on_host(state["first_loss"]))
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}",
                                     **({"outer": f"{state['outer_loss']:.3f}"} if state["outer_loss"] else {}),
                                     **({"skipped": self.engine.nonfinite_steps} if self.engine.nonfinite_steps
                                        else {}))
                self._log({"step": step, "train_loss": loss, "outer_loss": state["outer_loss"],
                           "lr": self.engine.scheduler.get_lr(Level.INNER),
                           "outer_lr": self.engine.scheduler.get_lr(Level.OUTER),
                           "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed,
                           "nonfinite_steps": self.engine.nonfinite_steps})
            if (run.eval_steps and step % run.eval_steps == 0 or step == run.max_steps) and step < total:
                self._evaluate(step)  # and at the end of the bi-level phase when retraining follows
            if run.save_steps and (step % run.save_steps == 0 or step == total):
                # The last step too (as HF Trainer): a finished run can be resumed with a larger
                # max_steps, and a crash in the final save or export loses nothing.
                self._save_checkpoint({**{k: on_host(v) for k, v in state.items()}, "position": position + 1,
                                       "last_loss": on_host(loss)})
        progress.close()
        train_time = time.perf_counter() - start
        self.phases.mark("training_after_first_step")
        after = self._evaluate(total)
        self.phases.mark("eval_after")
        before = state["before"]
        return {"eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
                # exact_match_before/after (token labels) or accuracy_before/after (a classifier)
                **{f"{key.removeprefix('eval_')}_{when}": value for when, metrics in (("before", before),
                   ("after", after)) for key, value in metrics.items() if key != "eval_loss"},
                "train_loss_first": state["first_loss"], "train_loss_last": loss,
                "tokens_per_s": tokens_seen / train_time, "train_time_s": train_time,
                "steps": total, "world_size": self.world_size, "nonfinite_steps": self.engine.nonfinite_steps}

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, state: dict) -> None:
        """DeepSpeed's checkpoint (collective) with the schedule position, schedules and RNG."""
        self._check_finite()
        client = {**state, "scheduler": self.engine.scheduler.state_dict(), "rng": checkpoint.rng_state(),
                  "nonfinite": [self.engine.nonfinite_steps, self.engine.nonfinite_in_a_row]}
        # The manifest records the schedule, so that a resume into another one is refused before launch.
        schedule = {"schedule": checkpoint.schedule_fields(self.engine.mode, self.run),
                    "position": state["position"], "inner_done": state["inner_done"]}
        checkpoint.save(self.engine.engine, self.output_dir, checkpoint.tag(state["inner_done"]),
                        {"ds_bilevel": client}, self.rank, manifest_extra=schedule)

    def _resume(self) -> dict:
        load_dir, tag = checkpoint.resolve(self.run.resume_from_checkpoint, self.output_dir)
        _, client = self.engine.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
        state = client["ds_bilevel"]
        scheduler = state.pop("scheduler")
        # The steps taken come from the checkpoint, the schedule's lengths from this run: a run
        # resumed with a larger max_steps decays its learning rate over the new length (as HF
        # Trainer does) instead of staying at the old schedule's end (0 for linear decay).
        # Unchanged settings give the saved lengths back exactly (launch/train.py refuses a
        # resume into a schedule whose first steps differ, checkpoint.check_schedule).
        totals = dict(self.engine.scheduler.totals)
        if state["inner_done"] > self.run.max_steps:  # inside the retraining phase: its own schedule
            totals[Level.INNER.value] = self.run.bilevel.retrain_steps
        self.engine.scheduler.load_state_dict({**scheduler, "totals": totals})
        self.engine.nonfinite_steps, self.engine.nonfinite_in_a_row = state.pop("nonfinite")
        checkpoint.set_rng_state(state.pop("rng"))
        return state

    def _level_values(self) -> dict[Level, dict[str, torch.Tensor]]:
        """The fp32 master value of every adapter parameter, by level (collective)."""
        module = self.engine.module
        return {level: {name: master_value(p).cpu() for name, p in named_level_parameters(module, level)}
                for level in Level}

    def _check_finite(self, values: dict | None = None) -> dict:
        """Refuse to save non-finite weights (the optimizer never writes them; this is the guard)."""
        values = values or self._level_values()
        bad = [name for by_name in values.values() for name, tensor in by_name.items()
               if not torch.isfinite(tensor).all()]
        if bad:
            raise NonFiniteError(f"adapter weights {bad[:3]} hold non-finite values; nothing was saved")
        return values

    @staticmethod
    def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
        if not before:
            return 0.0
        start = torch.cat([t.flatten() for t in before.values()])
        end = torch.cat([after[name].flatten() for name in before])
        return ((end - start).norm() / start.norm().clamp_min(1e-12)).item()

    # ---- save ------------------------------------------------------------------------------
    def save(self, summary: dict) -> dict:
        """Write the adapters (fp32 masters, safetensors) and the summary. Collective."""
        from safetensors.torch import save_file

        module = self.engine.module
        final = self._check_finite()
        tensors = {name: value for values in final.values() for name, value in values.items()}
        levels = {name: level.value for level, values in final.items() for name in values}
        # How far each level moved: a frozen outer level (the bf16 magnitude stall) shows as 0.
        summary["relative_change"] = {level.value: self.relative_change(self.initial[level], final[level])
                                      for level in Level}
        if self.run.checksum_base:
            summary["base_sha256"] = base_checksum(module)
        summary["peak_memory_gb_per_rank"] = peak_memory_per_rank()
        summary["adapted_layers"] = self.adapted_layers
        self.phases.mark("save")
        # Where a launch spends its time (seconds, in order): the start-up as much as the training.
        summary["phases"] = dict(self.phases.seconds)
        if self.rank == 0:
            save_file(tensors, str(self.output_dir / "adapter_model.safetensors"),
                      metadata={"method": self.run.adapter.method, "levels": json.dumps(levels)})
            summary["output_dir"] = str(self.output_dir.resolve())
            self.metrics_file.flush()
            summary["plot"] = str(plot_metrics(self.output_dir / "metrics.jsonl",
                                               self.output_dir / "training_curves.png",
                                               f"{self.run.adapter.method} on {self.run.model_name_or_path}"))
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def cleanup(self) -> None:
        import deepspeed.comm as dist

        if self.rank == 0:
            self.metrics_file.close()
        dist.barrier()
        if self.heartbeat is not None:
            self.heartbeat.stop()
