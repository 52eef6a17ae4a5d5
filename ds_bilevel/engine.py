"""BilevelEngine: one DeepSpeed engine over the whole model, adapter levels as param groups.

The adapter levels come from the adapters themselves (levels.py); the engine only
schedules them. This version runs the one-level baselines (LoRA, DoRA): every
optimizer step trains the inner group on a global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.config import RunConfig
from ds_bilevel.data import IGNORE_INDEX
from ds_bilevel.ds_config import offloads_optimizer, zero_stage
from ds_bilevel.levels import Level, level_parameters, regularizer
from ds_bilevel.optim import build_optimizer, build_param_groups, build_scheduler


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions, in fp32. logits (B, T, V)."""
    shifted = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class BilevelEngine:
    def __init__(self, model: torch.nn.Module, run: RunConfig, ds_config: dict):
        import deepspeed

        self.run = run
        groups = {level: level_parameters(model, level) for level in Level}
        lr = {Level.INNER: run.learning_rate, Level.OUTER: run.learning_rate}
        wd = {Level.INNER: run.weight_decay, Level.OUTER: run.weight_decay}
        optimizer = build_optimizer(build_param_groups(groups, lr, wd), offload=offloads_optimizer(ds_config))
        scheduler = build_scheduler(optimizer, run.lr_scheduler, run.max_steps, run.warmup_ratio)
        if zero_stage(ds_config) == 3:
            # An adapter reads its base weight outside base_layer's own forward (DoRA's norm,
            # merged forms): ZeRO-3 must gather a whole adapter layer, children included.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [AdapterLayer])
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.world_size = self.engine.world_size
        self.accumulation = self.engine.gradient_accumulation_steps()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _set_active_level(self, level: Level) -> None:
        # DeepSpeed wraps the client optimizer; the level flag lives on the innermost one.
        inner = self.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.active_level = level.value

    def forward_loss(self, batch: dict[str, torch.Tensor], num_global_tokens: int) -> tuple[torch.Tensor, float]:
        """This micro-batch's share of the global-batch mean loss, scaled for DeepSpeed.

        DeepSpeed divides by the accumulation steps and averages gradients over ranks;
        multiplying by (world x accumulation) / global tokens undoes both, so the
        step's gradient is the token mean over the whole global batch, however it is
        split across ranks and micro-steps (world-size invariance).
        """
        device = self.engine.device
        logits = self.engine(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits
        summed = token_loss_sum(logits, batch["labels"].to(device))
        scale = self.world_size * self.accumulation / num_global_tokens
        loss = summed * scale
        reg = regularizer(self.engine.module, Level.INNER)
        if reg is not None:
            loss = loss + reg
        return loss, summed.item()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], num_global_tokens: int) -> float:
        """One optimizer step of the inner level over this rank's micro-batches.

        Returns this rank's summed token loss (the caller reduces it across ranks).
        """
        self._set_active_level(Level.INNER)
        self.engine.train()
        total = 0.0
        for batch in micro_batches:
            loss, summed = self.forward_loss(batch, num_global_tokens)
            self.engine.backward(loss)
            self.engine.step()
            total += summed
        return total
