"""Datasets, tokenisation and a world-size-independent batch order.

Two formats, both trained as causal language modelling with the loss on the answer only
(labels are -100 on the prompt and on padding):

- ``instruction``: a prompt field and a response field; with the tokenizer's chat template
  when it has one (the prompt as a user turn, the response as the assistant's answer);
- ``classification``: a text field and a label field (GLUE-style); the label is written
  out as a word (``label_names``) and predicted as the answer, so accuracy is the exact
  match of that word. Decoder models only: encoder models with a classification head are
  not supported by this release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN_DATASETS = {"builtin:instruct"}
FORMATS = ("instruction", "classification")
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100


@dataclass
class DataConfig:
    format: str = "instruction"
    """instruction (prompt + response fields) | classification (text + label fields)."""
    train_size: int = 2048
    """builtin:instruct only: number of generated training examples."""
    eval_size: int = 256
    """Evaluation examples (builtin: generated with another seed; files: held out from the file)."""
    prompt_field: str = "prompt"
    """Column holding the instruction."""
    response_field: str = "response"
    """Column holding the answer; the loss is taken on these tokens only."""
    text_field: str = "text"
    """classification: column holding the text to classify."""
    label_field: str = "label"
    """classification: column holding the label (an integer index or a string)."""
    label_names: list[str] = field(default_factory=list)
    """classification: the words integer labels stand for (label i -> label_names[i]); empty: the digits."""
    chat_template: bool = True
    """instruction: wrap the prompt with the tokenizer's chat template when it has one."""
    validation_file: str = ""
    """A separate file used as D2 (the outer level's data) instead of a share of the training data."""
    hub_split: str = "train"
    """Split to read when ``dataset`` is a hub dataset name rather than a local file."""
    max_length: int = 64
    """Prompt + response tokens are truncated to this length (the prompt is cut first)."""

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format: {self.format!r} is not one of {list(FORMATS)}")
        if self.validation_file and not Path(self.validation_file).is_file():
            raise ValueError(f"data.validation_file: file {self.validation_file!r} does not exist")
        for name in ("train_size", "eval_size", "max_length"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"data.{name}: {value!r} must be an integer >= 1")


def load_records(dataset: str, config: DataConfig, seed: int):
    """(train, eval) as ``datasets.Dataset`` objects with prompt/response columns."""
    from datasets import Dataset

    if dataset in BUILTIN_DATASETS:
        from ds_bilevel.builtin.task import make_split

        train = Dataset.from_list(make_split(seed=seed, size=config.train_size))
        # A different generator seed: evaluation examples are fresh draws, not training ones.
        evaluation = Dataset.from_list(make_split(seed=seed + 7919, size=config.eval_size))
        return train, evaluation
    records = read_file_or_hub(dataset, config)
    if len(records) <= config.eval_size:
        raise ValueError(f"data.eval_size: {config.eval_size} leaves no training example out of {len(records)}")
    parts = records.train_test_split(test_size=config.eval_size, seed=seed)
    return parts["train"], parts["test"]


def read_file_or_hub(dataset: str, config: DataConfig, setting: str = "dataset"):
    """A local JSON/JSONL/CSV/Parquet file, or a hub dataset name, as prompt/response records.
    Errors are one line naming ``setting`` (the setting that gave ``dataset``)."""
    from functools import partial

    from datasets import load_dataset

    path = Path(dataset)
    if path.suffix in FILE_LOADERS:
        if not path.is_file():
            raise ValueError(f"{setting}: file {dataset!r} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"{setting}: file {dataset!r} is empty; allowed: a file holding examples")
        load = partial(load_dataset, FILE_LOADERS[path.suffix], data_files=str(path), split="train")
    elif "/" in dataset and not path.exists():  # owner/name on the hub (needs network access)
        load = partial(load_dataset, dataset, split=config.hub_split)
    else:
        raise ValueError(f"{setting}: {dataset!r} is neither a builtin ({sorted(BUILTIN_DATASETS)}), a file ending "
                         f"in {sorted(FILE_LOADERS)}, nor a hub name owner/name")
    try:
        records = load()
    except Exception as error:  # datasets raises StopIteration, ArrowInvalid, DatasetGenerationError, ...
        while error.__cause__ is not None:  # the parser's own message is the useful one
            error = error.__cause__
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{setting}: cannot read {dataset!r} ({type(error).__name__}: {detail}); "
                         f"allowed: a {path.suffix or 'hub'} dataset holding examples") from None
    return to_prompt_response(records, config, dataset, setting)


def to_prompt_response(records, config: DataConfig, source: str, setting: str = "dataset"):
    """Check the configured fields exist and map them to ``prompt`` / ``response`` columns."""
    keys = ("prompt_field", "response_field") if config.format == "instruction" else ("text_field", "label_field")
    fields = tuple(getattr(config, key) for key in keys)
    for key, value in zip(keys, fields, strict=True):
        if value not in records.column_names:
            raise ValueError(f"data.{key}: {value!r} is not a field of {source}; its fields are "
                             f"{records.column_names}")
    if len(records) == 0:
        raise ValueError(f"{setting}: {source} holds no example")
    names = config.label_names

    def convert(example):
        answer = example[fields[1]]
        if names and isinstance(answer, int):
            if not 0 <= answer < len(names):
                raise ValueError(f"data.label_names: label {answer} has no name among {names}")
            answer = names[answer]
        return {"prompt": str(example[fields[0]]), "response": str(answer)}

    return records.map(convert, remove_columns=records.column_names, desc="format")


def load_validation(config: DataConfig):
    """The explicit D2 file's records, or None when D2 is a share of the training data."""
    return read_file_or_hub(config.validation_file, config, "data.validation_file") if config.validation_file else None


def tokenize(records, tokenizer, config: DataConfig):
    """Map prompt/response to input_ids and labels (-100 on the prompt). Cached by datasets."""
    eos = tokenizer.eos_token_id
    use_template = config.format == "instruction" and config.chat_template and bool(tokenizer.chat_template)

    def encode(example):
        if use_template:
            prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}],
                                                        add_generation_prompt=True, tokenize=True, return_dict=False))
        else:
            prompt = tokenizer(example["prompt"] + "\n").input_ids
        response = tokenizer(example["response"], add_special_tokens=False).input_ids + [eos]
        prompt = prompt[-max(config.max_length - len(response), 1):]
        input_ids = (prompt + response)[: config.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[: config.max_length]
        return {"input_ids": input_ids, "labels": labels}

    return records.map(encode, remove_columns=records.column_names, desc="tokenize")


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class GlobalBatchOrder:
    """Which examples each step consumes, the same whatever the world size.

    Step t draws the global batch ``order[t*G : (t+1)*G]`` (G = global batch size) from
    a seeded permutation per epoch. Rank r's micro-step k takes the contiguous slice
    ``[(k*W + r) * m, (k*W + r + 1) * m)`` of it (m = micro batch, W = world size), so
    1, 2 or 4 ranks with the same G consume the same examples in the same step.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        if num_examples < global_batch:
            raise ValueError(f"train_batch_size: {global_batch} exceeds the {num_examples} training examples")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.steps_per_epoch = num_examples // global_batch  # the ragged tail is dropped

    def global_indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        return order[position * self.global_batch:(position + 1) * self.global_batch].tolist()

    def micro_indices(self, step: int, micro_step: int, rank: int, world_size: int, micro_batch: int) -> list[int]:
        start = (micro_step * world_size + rank) * micro_batch
        return self.global_indices(step)[start:start + micro_batch]
