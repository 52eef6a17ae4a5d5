"""What a run trains on, built the same way on every rank and in the plain-PyTorch reference:
the tokenizer and data sets, the model with its kernels, activation checkpointing, adapters and
loss head (``prepare``), and where each kind of step takes its batches (``batch_sources``).

The recipe (recipe.py), the reference (reference.py) and the tests build runs through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ds_bilevel.adapters import inject_adapters
from ds_bilevel.data import load_records, load_validation, tokenize_counting, truncation_warning
from ds_bilevel.heads import head_names, train_head
from ds_bilevel.kernels import apply_kernels, fused_linear_loss_fn
from ds_bilevel.levels import StepKind, TrainingMode
from ds_bilevel.loss_head import install_loss_head
from ds_bilevel.models import encoder_labels, load_model, load_tokenizer
from ds_bilevel.schedule import BatchSource, split_d1_d2
from ds_bilevel.validation import warn_once

if TYPE_CHECKING:
    from ds_bilevel.config import RunConfig
    from ds_bilevel.ds_config import DeepSpeedSettings
    from ds_bilevel.phases import Phases


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


def prepare(run: RunConfig, ds_config: dict | DeepSpeedSettings | None = None,
            phases: Phases | None = None) -> Prepared:
    mark = phases.mark if phases is not None else (lambda name: None)
    torch.manual_seed(run.seed)
    tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
    train, evaluation = load_records(run.dataset, run.data, run.seed)
    d2 = load_validation(run.data)
    labels = encoder_labels(run.model_name_or_path, run.trust_remote_code, run.data, train, evaluation, d2)
    sets, truncations = {}, {}
    for name, records in (("training", train), ("evaluation", evaluation), ("data.validation_file", d2)):
        if records is not None:
            sets[name], truncations[name] = tokenize_counting(records, tokenizer, run.data, labels)
    # Said once, before training: a cut answer loses its EOS, a cut text what it was about.
    warn_once(truncation_warning(run.data.max_length, truncations))
    train_set, eval_set, d2_set = sets["training"], sets["evaluation"], sets.get("data.validation_file")
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
    elif run.linear_cross_entropy or run.use_liger_kernel:
        # The loss computed inside the output head, never its logits (loss_head.py).
        install_loss_head(model, fused_linear_loss_fn() if run.use_liger_kernel else None)
    mark("model_and_adapters")
    return Prepared(tokenizer, train_set, eval_set, d2_set, model, labels, adapted)


def batch_sources(run: RunConfig, mode: TrainingMode, data: Prepared, rank: int,
                  world_size: int) -> dict[StepKind, BatchSource]:
    """Where each kind of step takes its batches: D1 and D2 for bi-level methods (a seeded
    split of the training set, or all of it and the explicit validation file), the whole
    training set otherwise; the retraining phase reads D1 and D2 together."""
    global_batch, pad_id = run.global_batch_size(world_size), data.tokenizer.pad_token_id

    def source(dataset, indices: list[int], seed: int) -> BatchSource:
        return BatchSource(dataset, indices, global_batch, run.micro_batch_size, rank, world_size, seed, pad_id)

    everything = list(range(len(data.train_set)))
    if mode != TrainingMode.BILEVEL:
        whole = source(data.train_set, everything, run.seed)  # one order: nothing in a source changes
        return {StepKind.INNER: whole, StepKind.SHARPNESS: whole}
    if data.d2_set is not None:
        from datasets import concatenate_datasets

        both = concatenate_datasets([data.train_set, data.d2_set])
        return {StepKind.INNER: source(data.train_set, everything, run.seed),
                StepKind.OUTER: source(data.d2_set, list(range(len(data.d2_set))), run.seed + 1),
                StepKind.RETRAIN: source(both, list(range(len(both))), run.seed + 2)}
    d1, d2 = split_d1_d2(len(everything), run.bilevel.split_ratio, run.seed)
    return {StepKind.INNER: source(data.train_set, d1, run.seed),
            StepKind.OUTER: source(data.train_set, d2, run.seed + 1),
            StepKind.RETRAIN: source(data.train_set, everything, run.seed + 2)}
