"""The training and evaluation losses, as sums: the caller divides by the global count.

Summing here and dividing once by the whole global batch's count (labelled tokens, or
examples for a classifier; ``data.labelled_count``) is what makes a pass's gradient the mean
over the global batch however it is split across ranks and micro-batches (engine.forward_loss).

Which loss applies is read off the labels' shape: (B, T) token labels are a causal LM's
(next-token cross-entropy on the labelled positions), (B,) class ids a sequence classifier's
(cross-entropy of the (B, C) logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_bilevel.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions, in fp32. logits (B, T, V), labels (B, T)."""
    shifted = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def class_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed classification cross-entropy over labelled examples, in fp32. logits (B, C), labels (B,)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def is_classification(labels: torch.Tensor) -> bool:
    return labels.dim() == 1


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed loss that ``labels`` call for (see the module docstring)."""
    return (class_loss_sum if is_classification(labels) else token_loss_sum)(logits, labels)


def predictions_right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the argmax class is the label, or (token labels) the argmax is the reference at
    every labelled position (exact match by teacher forcing). Unlabelled examples count as right."""
    if is_classification(labels):
        return (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(-1) == target) | (target == IGNORE_INDEX)).all(dim=1)
