"""Distributed evaluation: the loss and the share of right answers, reduced over ranks.

A causal LM is scored on its response tokens: exact match, measured by teacher forcing
(an example is right when the argmax at every response position, end-of-sequence
included, is the reference token). That is exactly when greedy decoding would produce the
reference answer, and it costs one forward instead of a generate loop. A classifier (class
labels) is scored by accuracy: the argmax class is the label.

Evaluation scores the model the user gets: the exported one. Bi-LoRA's auxiliary (ascent)
module is a training-time perturbation that the export drops (adapters/bilora_sam.py), so it is
switched off for the evaluation's forwards (``inference_forward``) and back on afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ds_bilevel.adapters.bilora_sam import auxiliary_layers
from ds_bilevel.data import IGNORE_INDEX, collate
from ds_bilevel.losses import is_classification, loss_sum, predictions_right


def rank_shard(num_examples: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of example indices, padded with -1 so all ranks run as many
    forwards (ZeRO-3 gathers parameters collectively in every forward)."""
    per_rank = math.ceil(num_examples / world_size)
    num_batches = math.ceil(per_rank / batch_size)
    mine = list(range(rank, num_examples, world_size))
    mine += [-1] * (num_batches * batch_size - len(mine))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@contextlib.contextmanager
def inference_forward(model: torch.nn.Module) -> Iterator[None]:
    """The model's forward as inference and the export compute it: every Bi-LoRA auxiliary
    module left out (its parameters stay as they are, at every ZeRO stage: the layer is
    gathered as usual, only the term is not added), restored on exit, errors included."""
    layers = auxiliary_layers(model)
    saved = [layer.auxiliary_enabled for layer in layers]
    for layer in layers:
        layer.auxiliary_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, saved, strict=True):
            layer.auxiliary_enabled = enabled


@torch.no_grad()
def local_totals(module: torch.nn.Module, dataset, pad_id: int, batches: list[list[int]]) -> torch.Tensor:
    """(loss sum, labelled count, right answers, examples) over ``batches`` of example indices
    (-1: padding, run but not counted), float64, not reduced, on the model's device. The caller
    picks the forward mode. Everything stays on the device: the logits of one batch at a real
    vocabulary are gigabytes (4 x 2048 x 128256 in fp32 = 4.2 GB), and a per-batch read would
    make the host wait for every forward."""
    device = module.device if hasattr(module, "device") else next(module.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    classes = is_classification(collate([dataset[0]], pad_id)["labels"])
    for indices in batches:
        valid = torch.tensor([i >= 0 for i in indices])
        batch = collate([dataset[max(i, 0)] for i in indices], pad_id)
        labels = batch["labels"].masked_fill(~(valid if classes else valid[:, None]), IGNORE_INDEX).to(device)
        valid = valid.to(device)
        logits = module(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device)).logits
        counted = labels if classes else labels[:, 1:]
        right = predictions_right(logits, labels) & valid
        totals += torch.stack([loss_sum(logits, labels).double(), (counted != IGNORE_INDEX).sum().double(),
                               right.sum().double(), valid.sum().double()])
    return totals


def metrics_from_totals(totals: torch.Tensor, classes: bool) -> dict[str, float]:
    summed, count, right, examples = totals.tolist()
    return {"eval_loss": summed / max(count, 1),
            "eval_accuracy" if classes else "eval_exact_match": right / max(examples, 1)}


@torch.no_grad()
def evaluate(engine, dataset, pad_id: int, batch_size: int) -> dict[str, float]:
    """{'eval_loss': mean loss per labelled token (per example for a classifier), and
    'eval_exact_match' (token labels) or 'eval_accuracy' (class labels): the share of right answers},
    of the model as exported (``inference_forward``)."""
    import deepspeed.comm as dist

    module = engine.ds_engine
    rank, world = dist.get_rank(), dist.get_world_size()
    classes = is_classification(collate([dataset[0]], pad_id)["labels"])
    module.eval()
    try:
        with inference_forward(module):
            totals = local_totals(module, dataset, pad_id, rank_shard(len(dataset), rank, world, batch_size))
    finally:
        module.train()
    reduced = totals.to(module.device)
    dist.all_reduce(reduced)
    return metrics_from_totals(reduced.cpu(), classes)
