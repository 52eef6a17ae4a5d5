"""A plain-PyTorch, one-process implementation of the same training loop: the tests' ground truth.

No DeepSpeed: the model is an ordinary fp32 module, each global batch is one forward, the
gradients come from autograd, and the regularisers are added explicitly
(``levels.regularizer``) rather than attached in the layers' forward. The schedule, the
data order, the optimizer maths (AdamW), the learning-rate schedule, the gradient clipping
and the hypergradient methods are the shared ones, so a DeepSpeed run at any stage and
world size must end where this does (to float rounding, in fp32).
"""

from __future__ import annotations

import dataclasses

import torch

from ds_bilevel.adapters.registry import METHODS
from ds_bilevel.config import RunConfig
from ds_bilevel.hypergrad import HYPERGRADS
from ds_bilevel.levels import Level, Objective, level_parameters, named_level_parameters, regularizer, training_mode
from ds_bilevel.losses import loss_sum
from ds_bilevel.optim import (
    LevelAdamW,
    adam_settings,
    apply_retraining_settings,
    level_max_grad_norm,
    level_param_groups,
    level_scheduler,
)
from ds_bilevel.preparation import batch_sources, prepare
from ds_bilevel.schedule import Batch, StepKind, events, run_steps, take_step
from ds_bilevel.zero_access import scale_compute_weights_


class ReferenceBilevel:
    """The same step API as ``BilevelEngine`` (schedule.Stepper; hypergrad.BilevelProblem)."""

    def __init__(self, model: torch.nn.Module, run: RunConfig):
        self.model, self.run, self.bilevel = model, run, run.bilevel
        self.mode, self.method = training_mode(model), METHODS[run.adapter.method]
        self.params = {level: level_parameters(model, level) for level in Level}
        self.optimizer = LevelAdamW(level_param_groups(self.params, run), **adam_settings(run))
        self.scheduler = level_scheduler(self.optimizer, run, self.mode)
        self.batches: dict[Objective, Batch] = {}
        self.losses: dict[Objective, float] = {}
        self._masters: list[torch.Tensor] | None = None
        self._initial_inner = [p.detach().clone() for p in self.params[Level.INNER]]

    # ---- hypergrad.BilevelProblem ----------------------------------------------------------
    def gradients(self, objective: Objective) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        micro_batches, tokens = self.batches[objective].micro_batches, self.batches[objective].labelled_tokens
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        data_loss = 0.0
        for k, batch in enumerate(micro_batches):  # one forward per global batch unless run_reference splits it
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_sum(logits, batch["labels"]) / tokens
            reg = regularizer(self.model, objective.level) if k == 0 else None
            (loss if reg is None else loss + reg).backward()
            data_loss += loss.item()
        self.losses[objective] = data_loss
        grads = {level: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params[level]]
                 for level in Level}
        self.model.zero_grad(set_to_none=True)
        return grads[Level.INNER], grads[Level.OUTER]

    @torch.no_grad()
    def perturb_inner(self, direction: list[torch.Tensor] | None, scale: float = 0.0):
        from ds_bilevel.hypergrad.problem import applied_scale

        if self._masters is None:
            self._masters = [p.detach().clone() for p in self.params[Level.INNER]]
        if direction is not None:  # the engine's rule: widened only for 16-bit weights (not in fp32)
            scale = applied_scale(scale, direction, self._masters, self.params[Level.INNER][0].dtype)
        values = self._masters if direction is None else [
            master + scale * d for master, d in zip(self._masters, direction, strict=True)]
        for param, value in zip(self.params[Level.INNER], values, strict=True):
            param.copy_(value)
        if direction is None:
            self._masters = None
        return scale

    def inner_learning_rate(self) -> float:
        """The rate of the inner step just taken (BilevelEngine.inner_learning_rate)."""
        return self.scheduler.last_lr(Level.INNER)

    # ---- steps (mirroring BilevelEngine) -----------------------------------------------------
    def _apply(self, grads: dict[Level, list[torch.Tensor]]) -> None:
        """Set the gradients of the stepping levels, clip their joint norm at these levels' value
        (optim.level_max_grad_norm, as the engine sets DeepSpeed's gradient_clipping), step those
        levels only."""
        params = [p for level in grads for p in self.params[level]]
        for param, grad in zip(params, [g for level in grads for g in grads[level]], strict=True):
            param.grad = grad
        max_norm = level_max_grad_norm(self.run, tuple(grads))
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.active_levels = frozenset(level.value for level in grads)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        for level in grads:
            self.scheduler.step(level)

    def inner_step(self, batch: Batch) -> float:
        self.batches[Objective.INNER] = batch
        inner, _ = self.gradients(Objective.INNER)
        self._apply({Level.INNER: inner})
        return self.losses[Objective.INNER]

    def outer_step(self, batch: Batch) -> float:
        self.batches[Objective.OUTER] = batch
        hypergrad = HYPERGRADS[self.bilevel.hypergrad](self, self.bilevel)
        self._apply({Level.OUTER: hypergrad})
        return self.losses[Objective.OUTER]

    def sharpness_step(self, batch: Batch) -> float:
        self.batches[Objective.INNER] = batch
        inner, outer = self.gradients(Objective.INNER)
        self._apply({Level.INNER: inner, Level.OUTER: [-g for g in outer]})
        if self.method.after_step is not None:  # Bi-LoRA's clip: the engine's function, on plain tensors
            self.method.after_step(self.model, self.run.adapter, scale_compute_weights_)
        return self.losses[Objective.INNER]

    @torch.no_grad()
    def start_retraining(self) -> None:
        for param, value in zip(self.params[Level.INNER], self._initial_inner, strict=True):
            param.copy_(value)
        self.optimizer.reset_state(Level.INNER)
        apply_retraining_settings(self.optimizer, self.scheduler, self.run, restart=True)

    def step(self, kind: StepKind, batch: Batch) -> float:
        return take_step(self, kind, batch)


def run_reference(run: RunConfig, global_batch: int, micro_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Train as ``launch/train.py`` would with a global batch of ``global_batch`` examples,
    in one process without DeepSpeed; returns the adapters by qualified name (fp32).

    Each pass is one forward over the global batch, or with ``micro_batch`` a sum of
    gradients over micro-batches of that size: the same maths in another summation order
    (the tests' measure of fp32 rounding noise)."""
    micro_batch = micro_batch or global_batch
    run = dataclasses.replace(run, micro_batch_size=micro_batch,
                              gradient_accumulation_steps=global_batch // micro_batch)
    data = prepare(run)
    model = data.model
    reference = ReferenceBilevel(model, run)
    schedule = list(events(reference.mode, run.max_steps, run.bilevel.unroll_steps, run.bilevel.outer_steps,
                           run.bilevel.retrain_steps))
    for _ in run_steps(reference, batch_sources(run, reference.mode, data, 0, 1), schedule):
        pass
    return {name: p.detach().clone() for level in Level for name, p in named_level_parameters(model, level)}
