"""The level-aware optimizer and learning-rate schedules handed to DeepSpeed.

One client optimizer holds both adapter levels as param groups tagged with a
``"level"`` key. DeepSpeed's ZeRO-1/2/3 optimizers keep custom keys on their
flattened fp32 partition groups, so ``step`` can move the active level only, at
every stage: the other level's master weights and Adam moments stay untouched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ds_bilevel.levels import Level, TrainingMode
from ds_bilevel.schedule import outer_step_count

if TYPE_CHECKING:
    from ds_bilevel.config import RunConfig


def all_ranks_finite(tensors: list[torch.Tensor], also: bool | torch.Tensor = True) -> bool:
    """True when every tensor is finite on every rank (and ``also``, a flag that may be a device
    tensor). Collective when a process group exists: under ZeRO each rank holds only a partition of
    the gradients, and all ranks must agree to skip. One host sync in all: the per-tensor checks
    stay on the device until the one flag is read."""
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.as_tensor(also, dtype=torch.float32, device=device).reshape(1).clone()
    if tensors:
        flag *= torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class LevelStepMixin:
    """``step`` moves only the param groups whose "level" is in ``active_levels``.

    With no active level a step moves nothing: the engine uses that to close a DeepSpeed
    accumulation cycle that only measured gradients. A step whose gradients are not finite
    on some rank, or whose loss the engine marked non-finite (``loss_is_finite``), moves
    nothing either - weights and Adam moments stay as they were - and sets ``skipped``.
    """

    active_levels: frozenset[str] = frozenset({Level.INNER.value})
    loss_is_finite: bool | torch.Tensor = True
    skipped: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        all_groups = self.param_groups
        active = [g for g in all_groups if g["level"] in self.active_levels]
        grads = [p.grad for g in active for p in g["params"] if p.grad is not None]
        self.skipped = bool(active) and not all_ranks_finite(grads, also=self.loss_is_finite)
        if self.skipped:
            return None
        # ZeRO-3 puts each flat fp32 partition into its group only for the duration of its step:
        # remember which level each stepped tensor belongs to (for reset_state).
        self.stepped = getattr(self, "stepped", {})
        for group in active:
            self.stepped.setdefault(group["level"], {}).update({id(p): p for p in group["params"]})
        self.param_groups = active
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups

    def reset_state(self, level: Level) -> None:
        """Forget the Adam moments and step counts of ``level`` (a restart from scratch)."""
        listed = [p for group in self.param_groups if group["level"] == level.value for p in group["params"]]
        for param in [*listed, *getattr(self, "stepped", {}).get(level.value, {}).values()]:
            self.state.pop(param, None)


class LevelAdamW(LevelStepMixin, torch.optim.AdamW):
    pass


def build_optimizer(param_groups: list[dict], offload: bool, betas=(0.9, 0.999), eps=1e-8):
    """LevelAdamW, or DeepSpeed's CPU Adam (same maths, AdamW mode) when ZeRO offloads the optimizer."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        level_cpu_adam = type("LevelCPUAdam", (LevelStepMixin, DeepSpeedCPUAdam), {})
        return level_cpu_adam(param_groups, betas=betas, eps=eps, adamw_mode=True)
    return LevelAdamW(param_groups, betas=betas, eps=eps)


def build_param_groups(groups: dict[Level, list[torch.nn.Parameter]], lr: dict[Level, float],
                       weight_decay: dict[Level, float]) -> list[dict]:
    """Param groups for LevelAdamW, one per non-empty level."""
    return [{"params": params, "level": level.value, "lr": lr[level], "weight_decay": weight_decay[level]}
            for level, params in groups.items() if params]


def schedule_lambda(kind: str, total_steps: int, warmup_steps: int):
    """Linear warm-up, then linear/cosine decay to 0 or constant (transformers' schedules, but for the
    warm-up's first step: transformers' takes it at rate 0, a step that changes nothing; here step k
    of w warm-up steps has (k + 1) / (w + 1) of the peak, docs/methods.md)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


class LevelScheduler:
    """One learning-rate schedule per level, each advancing only on its own level's steps.

    The engine steps it itself (it is not handed to DeepSpeed, whose scheduler would
    advance on every accumulation boundary, including the gradient-only ones).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: dict[Level, int],
                 warmup_ratio: float):
        self.optimizer, self.kind = optimizer, kind
        self.base_lr = {g["level"]: g["lr"] for g in optimizer.param_groups}
        self.totals = {level.value: total_steps[level] for level in Level}
        self.warmup_ratios = {level.value: warmup_ratio for level in Level}
        self.steps = {level.value: 0 for level in Level}
        self._build()

    def _build(self) -> None:
        self.factors = {level: schedule_lambda(self.kind, max(total, 1), int(self.warmup_ratios[level] * total))
                        for level, total in self.totals.items()}
        for level in self.base_lr:
            self._apply(level)

    def restart(self, level: Level, total_steps: int, lr: float | None = None,
                warmup_ratio: float | None = None) -> None:
        """A new schedule (warm-up and decay) over ``total_steps`` further steps of ``level``, peaking
        at ``lr`` with ``warmup_ratio`` of them warming up (None: as before)."""
        self.totals[level.value], self.steps[level.value] = total_steps, 0
        self.configure(level, lr, warmup_ratio)

    def configure(self, level: Level, lr: float | None = None, warmup_ratio: float | None = None) -> None:
        """Set the peak learning rate and warm-up share of ``level``'s schedule (None: unchanged)."""
        if lr is not None and level.value in self.base_lr:
            self.base_lr[level.value] = lr
        if warmup_ratio is not None:
            self.warmup_ratios[level.value] = warmup_ratio
        self._build()

    def _apply(self, level: str) -> None:
        for group in self.optimizer.param_groups:
            if group["level"] == level:
                group["lr"] = self.base_lr[level] * self.factors[level](self.steps[level])

    def step(self, level: Level) -> None:
        self.steps[level.value] += 1
        if level.value in self.base_lr:
            self._apply(level.value)

    def get_lr(self, level: Level) -> float:
        return next((g["lr"] for g in self.optimizer.param_groups if g["level"] == level.value), 0.0)

    def last_lr(self, level: Level) -> float:
        """The rate the level's last step took (``get_lr`` is the next step's); ``get_lr`` before any
        step. A function of the step count, so a resumed run reads the same value."""
        steps = self.steps[level.value]
        if steps == 0 or level.value not in self.base_lr:
            return self.get_lr(level)
        return self.base_lr[level.value] * self.factors[level.value](steps - 1)

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.totals = dict(state["steps"]), dict(state.get("totals", self.totals))
        self._build()


def level_param_groups(params: dict[Level, list[torch.nn.Parameter]], run: RunConfig) -> list[dict]:
    """The run's param groups: the inner level at learning_rate / weight_decay, the outer level at
    bilevel.outer_learning_rate (unset: learning_rate) / bilevel.outer_weight_decay."""
    lr = {Level.INNER: run.learning_rate, Level.OUTER: run.bilevel.outer_learning_rate or run.learning_rate}
    wd = {Level.INNER: run.weight_decay, Level.OUTER: run.bilevel.outer_weight_decay}
    return build_param_groups(params, lr, wd)


def adam_settings(run: RunConfig) -> dict:
    """The AdamW betas and eps of both levels (adam_beta1, adam_beta2, adam_epsilon)."""
    return {"betas": (run.adam_beta1, run.adam_beta2), "eps": run.adam_epsilon}


def level_max_grad_norm(run: RunConfig, levels: tuple[Level, ...]) -> float:
    """The gradient-norm clip of a step of ``levels`` (0: none): the outer level alone is clipped by
    bilevel.outer_max_grad_norm (-1: max_grad_norm), any other step by max_grad_norm."""
    if tuple(levels) == (Level.OUTER,) and run.bilevel.outer_max_grad_norm != -1:
        return run.bilevel.outer_max_grad_norm
    return run.max_grad_norm


def retraining_settings(run: RunConfig) -> tuple[float, float, float]:
    """(learning rate, weight decay, warm-up ratio) of the inner level in BiDoRA's retraining phase,
    the bilevel.retrain_* settings with their fallbacks resolved."""
    bilevel = run.bilevel
    return (bilevel.retrain_learning_rate or run.learning_rate,
            run.weight_decay if bilevel.retrain_weight_decay == -1 else bilevel.retrain_weight_decay,
            run.warmup_ratio if bilevel.retrain_warmup_ratio == -1 else bilevel.retrain_warmup_ratio)


def apply_retraining_settings(optimizer: torch.optim.Optimizer, scheduler: LevelScheduler, run: RunConfig,
                              restart: bool) -> None:
    """Give the inner level the retraining phase's weight decay (its param groups) and learning-rate
    schedule: a new one over retrain_steps (``restart``), or the same settings on the current one (a
    resume inside the phase, whose step count the checkpoint restores)."""
    lr, weight_decay, warmup = retraining_settings(run)
    for group in optimizer.param_groups:
        if group["level"] == Level.INNER.value:
            group["weight_decay"] = weight_decay
    if restart:
        scheduler.restart(Level.INNER, run.bilevel.retrain_steps, lr, warmup)
    else:
        scheduler.configure(Level.INNER, lr, warmup)


def level_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig, mode: TrainingMode) -> LevelScheduler:
    """The run's LevelScheduler: the inner level over max_steps, the outer over its steps in ``mode``."""
    total = {Level.INNER: run.max_steps, Level.OUTER: outer_step_count(
        mode, run.max_steps, run.bilevel.unroll_steps, run.bilevel.outer_steps)}
    return LevelScheduler(optimizer, run.lr_scheduler, total, run.warmup_ratio)
