"""Datasets, tokenisation and a world-size-independent batch order.

Two formats:

- ``instruction``: a prompt field and a response field; with the tokenizer's chat template
  when it has one (the prompt as a user turn, the response as the assistant's answer).
  Trained as causal language modelling with the loss on the answer only (labels are -100
  on the prompt and on padding);
- ``classification``: a text field and a label field (GLUE-style), with encoder or decoder
  models (the rule is in heads.py). A decoder writes the label out as a word
  (``label_names``) and predicts it as the answer, so accuracy is the exact match of that
  word. An encoder gets ``input_ids`` and one class id per example (``labels`` is an int) for
  its classification head: integer labels are the class ids, string labels are numbered in
  sorted order (``class_labels``; the run writes the list to labels.json).
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
    """Prompt + response tokens are truncated to this length (the prompt is cut first); at most the
    model's learned positions (GPT-2, OPT, BERT, RoBERTa)."""

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format: {self.format!r} is not one of {list(FORMATS)}")
        if self.validation_file and not Path(self.validation_file).is_file():
            raise ValueError(f"data.validation_file: file {self.validation_file!r} does not exist")
        for name in ("train_size", "eval_size", "max_length"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"data.{name}: {value!r} must be an integer >= 1")
        if self.max_length < 2:  # the first token is never predicted: one more for the answer
            raise ValueError(f"data.max_length: {self.max_length} leaves no answer token to train on; allowed: an "
                             f"integer >= 2")


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
        load = (partial(read_csv_as_written, path) if path.suffix == ".csv"
                else partial(load_dataset, FILE_LOADERS[path.suffix], data_files=str(path), split="train"))
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


def read_csv_as_written(path: Path):
    """A CSV file with every cell the text it holds. pandas' type guessing would make answers such
    as None, NA, null or nan nulls (the file refused) and rewrite number-like ones (007 -> 7.0,
    1e3 -> 1000.0, True -> a boolean), so that training would see other text than the file's.
    Only an empty cell is null (refused in a required field, check_field_values); integer
    labels become class ids in ``integer_labels``. The header is read by the same parser, so
    the column names are those datasets gives."""
    import pandas as pd
    from datasets import Features, Value, load_dataset

    columns = pd.read_csv(path, nrows=0).columns
    return load_dataset("csv", data_files=str(path), split="train", keep_default_na=False, na_values=[""],
                        features=Features({str(name): Value("string") for name in columns}))


def integer_labels(records, name: str):
    """A CSV label column whose every cell is an integer (0, 1, 007, +3) as int class ids, as a
    JSON file's integers are; any other column (True/False, pos/neg, 0.5) keeps its text as
    label names. Empty cells stay null (refused by check_field_values)."""
    import pyarrow.compute as pc
    from datasets import Value

    column = records.data.table.column(name)
    if column.null_count == len(column) or not pc.all(pc.match_substring_regex(column, r"^[+-]?\d+$")).as_py():
        return records
    features = records.features.copy()
    features[name] = Value("int64")
    return records.map(lambda batch: {name: [None if v is None else int(v) for v in batch[name]]}, batched=True,
                       features=features, desc="labels")


def to_prompt_response(records, config: DataConfig, source: str, setting: str = "dataset"):
    """Check the configured fields exist and map them to ``prompt`` / ``response`` columns."""
    instruction = config.format == "instruction"
    keys = ("prompt_field", "response_field") if instruction else ("text_field", "label_field")
    fields = tuple(getattr(config, key) for key in keys)
    for key, value in zip(keys, fields, strict=True):
        if value not in records.column_names:
            raise ValueError(f"data.{key}: {value!r} is not a field of {source}; its fields are "
                             f"{records.column_names}")
    if len(records) == 0:
        raise ValueError(f"{setting}: {source} holds no example")
    csv = Path(source).suffix == ".csv"
    if csv and not instruction:
        records = integer_labels(records, fields[1])
    for key, name in zip(keys, fields, strict=True):
        check_field_values(records, key, name, source, text=instruction or key == "text_field", csv=csv)
    if instruction:
        check_something_to_learn(records, fields[1], source)
    names = config.label_names

    def convert(example):
        answer = example[fields[1]]
        if names and isinstance(answer, int):
            if not 0 <= answer < len(names):
                raise ValueError(f"data.label_names: label {answer} has no name among {names}")
            answer = names[answer]
        out = {"prompt": str(example[fields[0]]), "response": str(answer)}
        # Classification keeps the raw label too: an encoder's class id comes from it (class_labels).
        return out if instruction else {**out, "label": example[fields[1]]}

    from datasets import Features, Value

    # Explicit: datasets would otherwise keep a same-named input column's type (a CSV's int64).
    text = {"prompt": Value("string"), "response": Value("string")}
    features = Features(text if instruction else {**text, "label": records.features[fields[1]]})
    return records.map(convert, remove_columns=records.column_names, features=features, desc="format")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_field_values(records, key: str, name: str, source: str, text: bool, csv: bool = False) -> None:
    """Refuse values that are not text (``text``) or not a label (an integer or a string, one kind
    throughout): null (in a CSV file, read as written, an empty cell), lists, objects, numbers,
    mixed kinds. One line naming the setting, the field, how many rows and the first one (from 1)."""
    import pyarrow as pa

    column = records.data.table.column(name)
    if (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) and column.null_count == 0:
        return  # the common case, without a pass over the values
    values = records[name]
    if text:
        bad = [(i, v) for i, v in enumerate(values) if _kind(v) != "text"]
        wanted = "text (a string)"
    else:
        kinds = {_kind(v) for v in values if _kind(v) in ("text", "a number")}
        bad = [(i, v) for i, v in enumerate(values) if _kind(v) not in ("text", "a number")
               or isinstance(v, float)]
        if not bad and len(kinds) > 1:
            first_text = next(i for i, v in enumerate(values) if isinstance(v, str))
            first_number = next(i for i, v in enumerate(values) if isinstance(v, int | float))
            raise ValueError(f"data.{key}: {name!r} in {source} mixes integers (first at row {first_number + 1}) and "
                             f"strings (first at row {first_text + 1}); allowed: labels of one kind, all integers "
                             f"(class ids) or all strings")
        wanted = "a label (an integer class id or a string)"
    if bad:
        first, value = bad[0]
        what = "an empty cell" if csv and value is None else f"{_kind(value)} ({str(value)[:40]!r})"
        raise ValueError(f"data.{key}: {name!r} in {source} is {what} in "
                         f"{len(bad)} of {len(values)} rows (first at row {first + 1}, counting from 1); allowed: "
                         f"{wanted} in every row")


def check_something_to_learn(records, name: str, source: str) -> None:
    """Refuse a file whose answers are all empty or whitespace: the loss would only teach EOS."""
    import pyarrow.compute as pc

    column = records.data.table.column(name).cast("string")
    if pc.all(pc.equal(pc.utf8_trim_whitespace(column), "")).as_py():
        raise ValueError(f"data.response_field: {name!r} is empty or whitespace in all {len(records)} rows of "
                         f"{source}: there is nothing to learn; allowed: answers with text")


def load_validation(config: DataConfig):
    """The explicit D2 file's records, or None when D2 is a share of the training data."""
    return read_file_or_hub(config.validation_file, config, "data.validation_file") if config.validation_file else None


def class_labels(config: DataConfig, *record_sets) -> list[str]:
    """The class names of an encoder run, index = class id, from the raw labels of every set.

    Integer labels are the ids themselves (0 .. max): named by ``label_names`` or by their
    digits. String labels are numbered in sorted order, or in ``label_names`` order when given.
    """
    raw = {label for records in record_sets if records is not None for label in records["label"]}
    if all(isinstance(label, int) for label in raw):
        if min(raw) < 0:
            raise ValueError(f"data.label_field: integer labels must be class ids >= 0; found {min(raw)}")
        count = max(raw) + 1
        if config.label_names and len(config.label_names) < count:
            raise ValueError(f"data.label_names: {config.label_names} names fewer than the {count} classes")
        return list(config.label_names) or [str(i) for i in range(count)]
    names = [str(label) for label in raw]
    if config.label_names:
        unnamed = sorted(set(names) - set(config.label_names))
        if unnamed:
            raise ValueError(f"data.label_names: labels {unnamed} are not among {config.label_names}")
        return list(config.label_names)
    return sorted(set(names))


def class_id(label, labels: list[str]) -> int:
    return label if isinstance(label, int) else labels.index(str(label))


def tokenize(records, tokenizer, config: DataConfig, labels: list[str] | None = None):
    """Map prompt/response to input_ids and labels (-100 on the prompt). Cached by datasets (a
    file's records: a later launch reads the tokenised set back).

    With ``labels`` (an encoder's class names): input_ids of the text with the tokenizer's own
    special tokens (BERT: [CLS] text [SEP]; RoBERTa: <s> text </s>), EOS appended only when the
    tokenizer closes the text with none (the builtin's: BOS text EOS); and ``labels`` = the
    example's class id, an int. An encoder needs no EOS: BERT's tokenizer has none.

    Past ``max_length`` the text is cut, never its special tokens: a classifier text keeps its
    first and its closing token ([SEP], </s>: BART/T5 classifiers read the EOS position), a
    causal LM's prompt is cut from the left after its BOS (the answer is kept whole when it
    fits; longer, it loses its end and EOS). ``tokenize_counting`` also says how many were cut.

    The tokenizer encodes a batch of texts per call (the ids are those of one text per call; 4x
    faster on the builtin task, issue 13); a chat template is applied per example."""
    return tokenize_counting(records, tokenizer, config, labels)[0]


@dataclass
class Truncation:
    """What ``data.max_length`` cut from one tokenised set."""

    examples: int
    cut: int  # examples longer than max_length
    answers_cut: int  # causal LM: of those, the answers that lost their end (and EOS)
    longest: int  # tokens of the longest example before the cut


def tokenize_counting(records, tokenizer, config: DataConfig, labels: list[str] | None = None):
    """``tokenize``'s set and its ``Truncation``. The lengths come back as columns of the same
    cached map, so a cached set is counted without tokenising it again; they are dropped after."""
    import pyarrow.compute as pc

    eos, bos, limit = tokenizer.eos_token_id, tokenizer.bos_token_id, config.max_length
    if labels is not None:
        closing = set(tokenizer.all_special_ids)

        def encode_classes(batch):
            out = {"input_ids": [], "labels": [class_id(label, labels) for label in batch["label"]],
                   "length": [], "answer_cut": []}
            for ids in tokenizer(batch["prompt"]).input_ids:
                if eos is not None and not (ids and ids[-1] in closing):
                    ids = ids + [eos]
                out["length"].append(len(ids))
                out["answer_cut"].append(False)
                if len(ids) > limit and ids[-1] in closing:  # cut the text, keep its closing token
                    ids = ids[: limit - 1] + ids[-1:]
                out["input_ids"].append(ids[:limit])
            return out

        encode_function = encode_classes
    else:
        use_template = config.format == "instruction" and config.chat_template and bool(tokenizer.chat_template)

        def encode(batch):
            if use_template:
                prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                              add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)) for text in batch["prompt"]]
            else:
                prompts = tokenizer([text + "\n" for text in batch["prompt"]]).input_ids
            out = {"input_ids": [], "labels": [], "length": [], "answer_cut": []}
            for prompt, response in zip(prompts, tokenizer(batch["response"], add_special_tokens=False).input_ids,
                                        strict=True):
                response = response + [eos]
                out["length"].append(len(prompt) + len(response))
                room = max(limit - len(response), 1)  # at least the prompt's last token (or its BOS)
                if len(prompt) > room:
                    # LLaMA-style models always see BOS first: cut the prompt after it.
                    keep = 1 if bos is not None and prompt[0] == bos else 0
                    prompt = prompt[:keep] + prompt[len(prompt) - room + keep:]
                out["answer_cut"].append(len(prompt) + len(response) > limit)
                out["input_ids"].append((prompt + response)[:limit])
                out["labels"].append(([IGNORE_INDEX] * len(prompt) + response)[:limit])
            return out

        encode_function = encode
    mapped = records.map(encode_function, batched=True, remove_columns=records.column_names, desc="tokenize")
    lengths, answers_cut = mapped.data.table.column("length"), mapped.data.table.column("answer_cut")
    truncation = Truncation(examples=len(mapped), cut=pc.sum(pc.greater(lengths, limit)).as_py() or 0,
                            answers_cut=pc.sum(answers_cut.cast("int64")).as_py() or 0,
                            longest=pc.max(lengths).as_py() or 0)
    return mapped.remove_columns(["length", "answer_cut"]), truncation


def truncation_warning(max_length: int, truncations: dict[str, Truncation]) -> str | None:
    """One line for the examples ``max_length`` cut (by set name: training, evaluation, ...), or
    None when nothing was cut."""
    parts = [f"{t.cut} of {t.examples} {name} examples"
             + (f" ({t.answers_cut} of them lost the end of their answer)" if t.answers_cut else "")
             for name, t in truncations.items() if t.cut]
    if not parts:
        return None
    longest = max(t.longest for t in truncations.values())
    return (f"data.max_length {max_length} cut {', '.join(parts)}; the longest is {longest} tokens; raise "
            f"data.max_length to keep them whole")


def labelled_count(labels: int | list[int]) -> int:
    """What one example adds to the loss's denominator: its predicted (shifted) labelled tokens,
    or 1 for a class label."""
    if isinstance(labels, int):
        return int(labels != IGNORE_INDEX)
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch. Class labels (ints) become a (B,) tensor."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    classes = isinstance(examples[0]["labels"], int)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        if not classes:
            labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    if classes:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
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
