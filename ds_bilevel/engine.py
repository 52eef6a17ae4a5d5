"""BilevelEngine: one DeepSpeed engine over the whole model, the adapter levels as param groups.

The adapters declare the levels and their training mode (levels.py, adapters/base.py); the
engine schedules them and is a ``hypergrad.BilevelProblem``, so the hypergradient methods
run on it unchanged.

How a step maps onto DeepSpeed. Each *pass* (forward/backward over this rank's
micro-batches of one global batch) is one DeepSpeed accumulation cycle: ``engine.backward``
per micro-batch, ``engine.step`` after each but the last, so that after the last backward
the gradients are reduced over all ranks and the cycle stays open at its boundary. There
the engine reads or replaces gradients (``zero_access``) and closes the cycle with
``engine.step`` while ``LevelAdamW`` moves only the levels it is told to: none after a pass
that only measured gradients, the outer level after a hypergradient. Every forward and
backward goes through the DeepSpeed engine, so ZeRO gathers, reduces and partitions as usual.
"""

from __future__ import annotations

import torch

from ds_bilevel import checkpoint
from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.adapters.registry import METHODS
from ds_bilevel.config import RunConfig
from ds_bilevel.distributed import destroy_engine, trim_forward_stack
from ds_bilevel.ds_config import DeepSpeedSettings
from ds_bilevel.hypergrad import HYPERGRADS
from ds_bilevel.levels import (
    Level,
    Objective,
    TrainingMode,
    adapter_layers,
    level_parameters,
    set_regularization,
    training_mode,
)
from ds_bilevel.loss_head import loss_head_of
from ds_bilevel.losses import loss_sum
from ds_bilevel.optim import (
    adam_settings,
    apply_retraining_settings,
    build_optimizer,
    level_max_grad_norm,
    level_param_groups,
    level_scheduler,
)
from ds_bilevel.outputs import NonFiniteError
from ds_bilevel.schedule import Batch, StepKind, take_step
from ds_bilevel.zero_access import (
    full_grads,
    master_value,
    master_values,
    scale_compute_weights_,
    scale_masters_,
    set_grad,
    set_master_value,
    write_compute_weights,
)


def _scale_masters_and_weights(params: list[torch.nn.Parameter], factor: torch.Tensor | float) -> None:
    scale_masters_(params, factor)
    scale_compute_weights_(params, factor)


def set_gradient_clipping(ds_engine, max_norm: float) -> None:
    """Make DeepSpeed clip the next engine.step at ``max_norm`` (0: off). DeepSpeed 0.19 reads the
    value at every step from two places: the ZeRO-1/2/3 and bf16 optimizer wrappers from their own
    ``clip_grad`` (copied from the config when they were built), fp32 without ZeRO from
    ``engine._config.gradient_clipping`` (``gradient_clipping()``, in ``_take_model_step``)."""
    ds_engine._config.gradient_clipping = max_norm
    if hasattr(ds_engine.optimizer, "clip_grad"):
        ds_engine.optimizer.clip_grad = max_norm


def innermost_optimizer(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class BilevelEngine:
    def __init__(self, model: torch.nn.Module, run: RunConfig, ds_config: dict | DeepSpeedSettings):
        import deepspeed

        settings = DeepSpeedSettings.read(ds_config)
        self.run, self.bilevel = run, run.bilevel
        self.mode, self.method = training_mode(model), METHODS[run.adapter.method]
        if self.mode is TrainingMode.SHARPNESS:  # the outer level's ascent happens in backward
            for _, layer in adapter_layers(model):
                layer.ascend_in_backward = True
        groups = {level: level_parameters(model, level) for level in Level}
        optimizer = build_optimizer(level_param_groups(groups, run), offload=settings.offload_optimizer,
                                    **adam_settings(run))
        self.zero3 = settings.zero_stage == 3
        if self.zero3:
            # An adapter reads its base weight outside base_layer's own forward (DoRA's norm):
            # ZeRO-3 must gather a whole adapter layer, children included.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [AdapterLayer])
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=settings.config)
        self.client_optimizer = innermost_optimizer(self.optimizer)
        self.scheduler = level_scheduler(self.client_optimizer, run, self.mode)
        self.params = {level: level_parameters(self.ds_engine.module, level) for level in Level}
        self.loss_head = loss_head_of(self.ds_engine.module)
        self.world_size = self.ds_engine.world_size
        self.accumulation = self.ds_engine.gradient_accumulation_steps()
        self.batches: dict[Objective, Batch] = {}
        self.losses: dict[Objective, float] = {}
        self._cycle_open = False
        self._masters: list[torch.Tensor] | None = None
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        # The inner level's initial values, for the retraining phase (full fp32 on every rank).
        self._initial_inner = ([master_value(p) for p in self.params[Level.INNER]]
                               if self.bilevel.retrain_steps else None)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds_engine.module

    def close(self) -> None:
        """Free the model, its optimizer states and gradient buffers now (``distributed.destroy_engine``):
        a process that trains again (bench/gpu_worker.py, a sweep, a notebook) kept each earlier
        run's model on the device (measured on an H100: 1.5 GB per run of builtin:mid-llama)."""
        destroy_engine(self.ds_engine)
        self.batches.clear()
        self._masters = self._initial_inner = None

    # ---- passes --------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, torch.Tensor], labelled_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the global-batch mean loss, scaled for DeepSpeed.

        DeepSpeed divides by the accumulation steps and averages gradients over ranks;
        multiplying by (world x accumulation) / global count undoes both, so a pass's
        gradient is the mean over the whole global batch, however it is split across ranks and
        micro-steps (world-size invariance). The count is labelled tokens, or examples for a
        classifier (``labelled_tokens`` of the batch; the loss itself is ``losses.loss_sum``).
        Also returns the unscaled sum, detached and left on the device: reading it here would make
        the host wait for this forward before it can queue the backward.
        """
        device = self.ds_engine.device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        labels = batch["labels"].to(device)
        if self.loss_head is not None:  # the head returns the summed loss itself (loss_head.py)
            with self.loss_head.scoring(labels):
                summed = self.ds_engine(**inputs).logits
        else:
            summed = loss_sum(self.ds_engine(**inputs).logits, labels)
        return summed * (self.world_size * self.accumulation / labelled_tokens), summed.detach()

    def _run_pass(self, objective: Objective) -> None:
        """Backward over the current batch of ``objective``, leaving the cycle open with the
        gradients reduced (see the module docstring)."""
        import deepspeed.comm as dist

        self._close_cycle()
        batch = self.batches[objective]
        # The regularisers depend on the weights alone: the first micro-batch carries their whole
        # gradient (as the reference adds them once per pass) and the others skip them, which saves
        # (accumulation - 1) of their forward, recomputation and backward per pass (BiLoRA's R1: two
        # Gram matrices per layer). Detached only after its backward, where checkpointing recomputes
        # the forward as it ran.
        set_regularization(self.module, (objective.level,))
        self.ds_engine.train()
        summed = torch.zeros((), dtype=torch.float64, device=self.ds_engine.device)
        for k, micro in enumerate(batch.micro_batches):
            loss, micro_sum = self.forward_loss(micro, batch.labelled_tokens)
            self.ds_engine.backward(loss)
            if k == 0:
                set_regularization(self.module, ())
            summed += micro_sum
            if k < len(batch.micro_batches) - 1:
                self.ds_engine.step()  # inside the accumulation window: DeepSpeed only counts it
        self._cycle_open = True
        if self.zero3:
            trim_forward_stack(self.ds_engine.module)  # what checkpointing's recomputations left there
        dist.all_reduce(summed)  # on the device; read by the caller once per logged step
        self.losses[objective] = summed / batch.labelled_tokens

    def _step_levels(self, levels: tuple[Level, ...], loss: torch.Tensor) -> None:
        """Close the open cycle with an optimizer step of ``levels``. LevelAdamW skips it (nothing
        moves) when ``loss`` or any gradient is not finite; skipped steps are counted, and
        ``max_nonfinite_steps`` of them in a row stop the run. ZeRO's optimizers check the
        gradients themselves and skip before reaching LevelAdamW ("OVERFLOW! Skipping step"):
        DeepSpeed's skipped_steps counts those. The loss's finiteness stays a device tensor: LevelAdamW
        reads it together with the gradients' in its one host sync per step."""
        self.client_optimizer.loss_is_finite, self.client_optimizer.skipped = torch.isfinite(loss), False
        skipped_by_deepspeed = self.ds_engine.skipped_steps
        # Only the stepping levels' gradients are non-zero here (_zero_grads), so DeepSpeed's global
        # clip is a clip of these levels' own norm: give it their value.
        set_gradient_clipping(self.ds_engine, level_max_grad_norm(self.run, levels))
        self._close_cycle(levels)
        self.client_optimizer.loss_is_finite = True
        if not (self.client_optimizer.skipped or self.ds_engine.skipped_steps > skipped_by_deepspeed):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.run.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last loss "
                f"{float(loss)}); stopping as max_nonfinite_steps={self.run.max_nonfinite_steps} says. The weights and "
                f"checkpoints hold no non-finite value: resume from the last checkpoint with a lower learning_rate "
                f"or max_grad_norm, or check the data (docs/failures.md)")

    def _close_cycle(self, levels: tuple[Level, ...] = ()) -> None:
        """engine.step at the open boundary, moving only ``levels`` (none: a measuring pass)."""
        if self._cycle_open:
            self.client_optimizer.active_levels = frozenset(level.value for level in levels)
            self.ds_engine.step()
            self._cycle_open = False

    def _zero_grads(self, level: Level) -> None:
        # DeepSpeed clips the global norm of all gradients present: the level that does not
        # step must not count.
        for param in self.params[level]:
            shape = param.ds_shape if hasattr(param, "ds_id") else param.shape
            set_grad(param, torch.zeros(shape, device=self.ds_engine.device))

    # ---- hypergrad.BilevelProblem ----------------------------------------------------------
    def gradients(self, objective: Objective) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._run_pass(objective)
        inner = len(self.params[Level.INNER])
        grads = full_grads(self.params[Level.INNER] + self.params[Level.OUTER])
        return grads[:inner], grads[inner:]

    def perturb_inner(self, direction: list[torch.Tensor] | None, scale: float | torch.Tensor = 0.0):
        """Set the compute weights of the inner level to master + s * direction and return s: the
        requested ``scale``, widened under bf16/fp16 compute weights so that the move is not
        rounded away (hypergrad.problem.applied_scale; fp32 is unchanged). The fp32 masters are
        never written, so ``None`` restores exactly. The open cycle is closed first (its step
        rewrites compute weights from the masters), except on restore, which keeps the last
        pass's gradients for the outer step."""
        from ds_bilevel.hypergrad.problem import applied_scale

        if direction is not None:
            self._close_cycle()
        if self._masters is None:
            self._masters = master_values(self.params[Level.INNER])
        values = self._masters
        if direction is not None:
            direction = [d.to(master.device) for master, d in zip(self._masters, direction, strict=True)]
            first = self.params[Level.INNER][0]
            compute_dtype = (first.ds_tensor if hasattr(first, "ds_id") else first).dtype
            scale = applied_scale(scale, direction, self._masters, compute_dtype)
            # a device scalar where the masters are (offloaded: the host, as the direction already is)
            step = scale.to(self._masters[0].device) if isinstance(scale, torch.Tensor) else scale
            # master + step * d for every parameter in two multi-tensor ops (one kernel each on a
            # GPU, not two per parameter); the same arithmetic as the reference's.
            values = torch._foreach_add(self._masters, torch._foreach_mul(direction, step))
        write_compute_weights(self.params[Level.INNER], values)
        if direction is None:
            self._masters = None
        return scale

    def inner_learning_rate(self) -> float:
        """The rate of the inner step just taken (Neumann's alpha, original DARTS's xi: the step
        w* = w - xi grad that the hypergradient differentiates through), not the next step's: the
        schedule has already moved on, and at a linear schedule's last outer step the next rate is 0,
        which made that step first-order."""
        return self.scheduler.last_lr(Level.INNER)

    # ---- steps -----------------------------------------------------------------------------
    def inner_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step of the inner level on ``batch`` (D1, or all data for one level)."""
        self.batches[Objective.INNER] = batch
        self._run_pass(Objective.INNER)
        if self.params[Level.OUTER]:
            self._zero_grads(Level.OUTER)
        self._step_levels((Level.INNER,), self.losses[Objective.INNER])
        self.scheduler.step(Level.INNER)
        return self.losses[Objective.INNER]

    def outer_step(self, batch: Batch) -> torch.Tensor:
        """One outer step on ``batch`` (D2) with the configured hypergradient. The inner-objective
        passes of second-order methods use the last inner batch."""
        self.batches[Objective.OUTER] = batch
        hypergrad = HYPERGRADS[self.bilevel.hypergrad](self, self.bilevel)
        # The last pass's cycle is still open: it carries the outer step.
        self._zero_grads(Level.INNER)
        for param, value in zip(self.params[Level.OUTER], hypergrad, strict=True):
            set_grad(param, value)
        self._step_levels((Level.OUTER,), self.losses[Objective.OUTER])
        self.scheduler.step(Level.OUTER)
        return self.losses[Objective.OUTER]

    def sharpness_step(self, batch: Batch) -> torch.Tensor:
        """Bi-LoRA: one pass; the primary (inner) level descends, the auxiliary (outer) level
        ascends (AdamW on the gradient its layers' backward already negated, ascend_in_backward),
        then the global clip to rho."""
        self.batches[Objective.INNER] = batch
        self._run_pass(Objective.INNER)
        self._step_levels((Level.INNER, Level.OUTER), self.losses[Objective.INNER])
        self.scheduler.step(Level.INNER)
        self.scheduler.step(Level.OUTER)
        self._after_step()
        return self.losses[Objective.INNER]

    def _after_step(self) -> None:
        """The method's own step hook (registry ``after_step``: Bi-LoRA's clip), scaling every rank's
        share of the fp32 masters and its compute weights: no per-parameter communication."""
        if self.method.after_step is not None:
            self.method.after_step(self.module, self.run.adapter, _scale_masters_and_weights)

    def start_retraining(self) -> None:
        """BiDoRA's retraining phase (arXiv 2410.09758, after the bi-level search): the outer level
        (magnitude) stays as the bi-level phase left it; the inner level (direction) restarts from
        its initial values, with fresh Adam moments and a new schedule over retrain_steps, at the
        bilevel.retrain_* learning rate, weight decay and warm-up."""
        for param, value in zip(self.params[Level.INNER], self._initial_inner, strict=True):
            set_master_value(param, value)
        self.client_optimizer.reset_state(Level.INNER)
        apply_retraining_settings(self.client_optimizer, self.scheduler, self.run, restart=True)

    def step(self, kind: StepKind, batch: Batch) -> torch.Tensor:
        """One step of ``kind``; its loss as a device tensor (read it only when logging)."""
        return take_step(self, kind, batch)

    # ---- what a checkpoint holds of the engine besides DeepSpeed's own state ------------------
    def state_dict(self) -> dict:
        """The level schedules and the non-finite step counters (DeepSpeed's checkpoint holds the
        weights and the optimizer)."""
        return {"scheduler": self.scheduler.state_dict(), "nonfinite": [self.nonfinite_steps, self.nonfinite_in_a_row]}

    def load_state_dict(self, state: dict, inner_done: int) -> None:
        """Restore ``state_dict()`` after ``inner_done`` inner steps. The steps taken come from the
        checkpoint, the schedules' lengths from this run: a run resumed with a larger max_steps
        decays its learning rate over the new length (as HF Trainer does) instead of staying at
        the old schedule's end (0 for linear decay). Unchanged settings give the saved lengths back
        exactly (launch/train.py refuses a resume into a schedule whose first steps differ,
        checkpoint.check_schedule). Inside the retraining phase the inner level has its own."""
        totals = dict(self.scheduler.totals)
        if inner_done > self.run.max_steps:
            totals[Level.INNER.value] = self.bilevel.retrain_steps
        self.scheduler.load_state_dict({**state["scheduler"], "totals": totals})
        if inner_done > self.run.max_steps:
            apply_retraining_settings(self.client_optimizer, self.scheduler, self.run, restart=False)
        self.nonfinite_steps, self.nonfinite_in_a_row = state["nonfinite"]

    # ---- the DeepSpeed engine's services the recipe uses ---------------------------------------
    def write_monitor_events(self, events: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows to DeepSpeed's monitors (TensorBoard, CSV, W&B, as configured)."""
        self.ds_engine.monitor.write_events(events)

    def save_checkpoint(self, output_dir, tag: str, client_state: dict, rank: int, manifest_extra: dict) -> None:
        """DeepSpeed's checkpoint with ``client_state`` (checkpoint.save: atomic, verified). Collective."""
        checkpoint.save(self.ds_engine, output_dir, tag, client_state, rank, manifest_extra=manifest_extra)

    def load_checkpoint(self, load_dir, tag: str) -> dict:
        """Load DeepSpeed's checkpoint (weights, optimizer) and return its client state."""
        _, client = self.ds_engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
        return client
