"""The level-aware optimizer and learning-rate schedules handed to DeepSpeed.

One client optimizer holds both adapter levels as param groups tagged with a
``"level"`` key. DeepSpeed's ZeRO-1/2/3 optimizers keep custom keys on their
flattened fp32 partition groups, so ``step`` can move the active level only, at
every stage: the other level's master weights and Adam moments stay untouched.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ds_bilevel.levels import Level


class LevelStepMixin:
    """``step`` moves only the param groups whose "level" is ``active_level``."""

    active_level: str = Level.INNER.value

    @torch.no_grad()
    def step(self, closure=None):
        all_groups = self.param_groups
        self.param_groups = [g for g in all_groups if g["level"] == self.active_level]
        try:
            return super().step(closure)
        finally:
            self.param_groups = all_groups


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
    """Linear warm-up from 0, then linear/cosine decay to 0 or constant (as transformers' schedules)."""

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


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_ratio: float) -> LambdaLR:
    factor = schedule_lambda(kind, total_steps, int(warmup_ratio * total_steps))
    return LambdaLR(optimizer, [factor] * len(optimizer.param_groups))
