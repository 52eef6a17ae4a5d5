"""Distributed evaluation: response-token loss and exact match, reduced over ranks.

Exact match is measured by teacher forcing: an example is right when the argmax
at every response position (end-of-sequence included) is the reference token.
That is exactly when greedy decoding would produce the reference answer, and it
costs one forward instead of a generate loop.
"""

from __future__ import annotations

import math

import torch

from ds_bilevel.data import IGNORE_INDEX, collate
from ds_bilevel.engine import token_loss_sum


def rank_shard(num_examples: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of example indices, padded with -1 so all ranks run as many
    forwards (ZeRO-3 gathers parameters collectively in every forward)."""
    per_rank = math.ceil(num_examples / world_size)
    num_batches = math.ceil(per_rank / batch_size)
    mine = list(range(rank, num_examples, world_size))
    mine += [-1] * (num_batches * batch_size - len(mine))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def evaluate(engine, dataset, pad_id: int, batch_size: int) -> dict[str, float]:
    """{'eval_loss': mean response-token loss, 'eval_exact_match': share of exact answers}."""
    import deepspeed.comm as dist

    module = engine.engine
    module.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, exact, examples
    for indices in rank_shard(len(dataset), rank, world, batch_size):
        valid = torch.tensor([i >= 0 for i in indices])
        batch = collate([dataset[max(i, 0)] for i in indices], pad_id)
        labels = batch["labels"].masked_fill(~valid[:, None], IGNORE_INDEX)
        logits = module(input_ids=batch["input_ids"].to(module.device),
                        attention_mask=batch["attention_mask"].to(module.device)).logits.float().cpu()
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        exact = ((logits[:, :-1].argmax(-1) == target) | ~mask).all(dim=1) & valid
        totals += torch.tensor([token_loss_sum(logits, labels).item(), mask.sum().item(),
                                exact.sum().item(), valid.sum().item()], dtype=torch.float64)
    reduced = totals.to(module.device)
    dist.all_reduce(reduced)
    loss_sum, tokens, exact, examples = reduced.tolist()
    module.train()
    return {"eval_loss": loss_sum / max(tokens, 1), "eval_exact_match": exact / max(examples, 1)}
