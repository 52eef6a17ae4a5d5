import json

import pytest
from datasets import Dataset

from ds_bilevel.data import IGNORE_INDEX, DataConfig, GlobalBatchOrder, collate, load_records, tokenize
from ds_bilevel.models import load_tokenizer


@pytest.mark.parametrize("world_size,accumulation", [(1, 4), (2, 2), (4, 1)])
def test_batch_order_is_world_size_independent(world_size, accumulation):
    micro = 8 // (world_size * accumulation) * 2
    global_batch = micro * accumulation * world_size
    reference = GlobalBatchOrder(100, global_batch, seed=3)
    for step in range(30):  # crosses epoch boundaries (6 steps per epoch)
        consumed = [i for k in range(accumulation) for r in range(world_size)
                    for i in reference.micro_indices(step, k, r, world_size, micro)]
        assert consumed == GlobalBatchOrder(100, global_batch, seed=3).global_indices(step)
    one_rank = GlobalBatchOrder(100, global_batch, seed=3)
    assert one_rank.global_indices(7) == reference.global_indices(7)
    assert reference.global_indices(0) != GlobalBatchOrder(100, global_batch, seed=4).global_indices(0)


def test_each_epoch_is_a_permutation():
    order = GlobalBatchOrder(40, 8, seed=0)
    epoch = [i for step in range(5) for i in order.global_indices(step)]
    assert sorted(epoch) == list(range(40))


def test_tokenize_masks_prompt_and_appends_eos():
    tokenizer = load_tokenizer("builtin:tiny-llama")
    train, _ = load_records("builtin:instruct", DataConfig(train_size=8, eval_size=4), seed=0)
    row = tokenize(train, tokenizer, DataConfig())[0]
    answer = tokenizer(train[0]["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert labelled == answer
    assert row["input_ids"][-len(answer):] == answer
    assert row["input_ids"][0] == tokenizer.bos_token_id


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_local_jsonl_file_and_missing_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "response": f"a{i}"}) for i in range(20)))
    expected = r"data.prompt_field: .prompt. is not a field of .*; its fields are \['question', 'response'\]"
    with pytest.raises(ValueError, match=expected):
        load_records(str(path), DataConfig(eval_size=4), seed=0)
    train, evaluation = load_records(str(path), DataConfig(eval_size=4, prompt_field="question"), seed=0)
    assert (len(train), len(evaluation)) == (16, 4)
    assert sorted(train.column_names) == ["prompt", "response"]
    assert not set(train["prompt"]) & set(evaluation["prompt"])


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="dataset: 'builtin:nope' is neither a builtin"):
        load_records("builtin:nope", DataConfig(), seed=0)


def test_csv_classification_with_label_names(tmp_path):
    path = tmp_path / "sst.csv"
    path.write_text("sentence,label\n" + "\n".join(f"movie number {i} was fine,{i % 2}" for i in range(12)))
    config = DataConfig(format="classification", text_field="sentence", eval_size=2,
                        label_names=["negative", "positive"])
    train, evaluation = load_records(str(path), config, seed=0)
    rows = {r["prompt"]: r["response"] for r in [*train, *evaluation]}
    assert rows["movie number 3 was fine"] == "positive" and rows["movie number 4 was fine"] == "negative"
    with pytest.raises(ValueError, match=r"data.text_field: .text. is not a field of"):
        load_records(str(path), DataConfig(format="classification", eval_size=2), seed=0)


def test_parquet_and_explicit_validation_file(tmp_path):
    from datasets import Dataset

    from ds_bilevel.data import load_validation

    Dataset.from_list([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "d2.jsonl").write_text("\n".join(json.dumps({"prompt": f"v{i}", "response": "x"}) for i in range(3)))
    config = DataConfig(eval_size=2, validation_file=str(tmp_path / "d2.jsonl"))
    train, _ = load_records(str(tmp_path / "t.parquet"), config, seed=0)
    assert len(train) == 8
    assert load_validation(config)["prompt"] == ["v0", "v1", "v2"]
    assert load_validation(DataConfig()) is None


def test_chat_template_wraps_the_prompt_only():
    tokenizer = load_tokenizer("builtin:tiny-llama")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %} [assistant]"
    train, _ = load_records("builtin:instruct", DataConfig(train_size=2, eval_size=1), seed=0)
    with_template = tokenize(train, tokenizer, DataConfig())[0]
    plain = tokenize(train, tokenizer, DataConfig(chat_template=False))[0]
    expected_prompt = tokenizer(f"[user] {train[0]['prompt']} [assistant]", add_special_tokens=False).input_ids
    prompt_ids = [t for t, label in zip(with_template["input_ids"], with_template["labels"], strict=True)
                  if label == IGNORE_INDEX]
    assert prompt_ids == expected_prompt
    labelled = [t for t in with_template["labels"] if t != IGNORE_INDEX]
    assert labelled == [t for t in plain["labels"] if t != IGNORE_INDEX]  # the answer is the same


def test_an_encoder_needs_no_eos():
    """BERT's WordPiece tokenizer has no EOS: the text keeps its own [CLS] ... [SEP] and nothing is
    appended (an EOS id of None crashed tokenisation: "Could not infer dtype of NoneType")."""
    from datasets import Dataset
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "even"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    assert tokenizer.eos_token_id is None
    records = Dataset.from_list([{"prompt": "a b even", "response": "yes", "label": "yes"}])
    row = tokenize(records, tokenizer, DataConfig(format="classification"), labels=["no", "yes"])[0]
    assert row == {"input_ids": [2, 5, 6, 7, 3], "labels": 1}
    builtin = load_tokenizer("builtin:tiny-llama")  # a tokenizer that closes with nothing gets its EOS
    ids = tokenize(records, builtin, DataConfig(format="classification"), labels=["no", "yes"])[0]["input_ids"]
    assert ids[0] == builtin.bos_token_id and ids[-1] == builtin.eos_token_id and ids.count(builtin.eos_token_id) == 1


def test_a_tokenizer_without_eos_is_refused_before_launch_for_a_causal_lm(tmp_path):
    """What a tokenizer lacks is found by the launcher's checks, in one line naming the setting."""
    import torch
    from transformers import BertTokenizer, LlamaConfig, LlamaForCausalLM

    from ds_bilevel.config import RunConfig
    from ds_bilevel.validation import check_run

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp_path)
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])}
                  ).save_pretrained(tmp_path)
    run = RunConfig(model_name_or_path=str(tmp_path), output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"^model_name_or_path: the tokenizer in .* has no eos_token, which a causal "
                                         r"LM's answers end with; allowed: .*eos_token"):
        check_run(run, 1)


# ---- a CSV's cells are read as written (no type guessing) ------------------------------------------
def csv_file(path, header: str, rows: list[str]) -> str:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def all_rows(dataset: str, config: DataConfig) -> list[dict]:
    """Every record training and evaluation read, in the file's order (the split shuffles them)."""
    train, evaluation = load_records(dataset, config, seed=0)
    return sorted([*train, *evaluation], key=lambda row: int(row["prompt"].split()[-1]))


NULL_WORDS = ["None", "NA", "null", "nan", "NaN", "N/A", "n/a", "NULL", "#N/A", "-nan", "<NA>", "4"]  # pandas' nulls
NUMBERS = ["007", "0.50", "1e3", "02139", "-0", "+3", "3.14159265358979323846", "1.", "-.5"]  # pandas: floats
INTEGERS = ["007", "-0", "+3", "02139"]  # pandas: integers
NUMBER_LIKE = ["0x1F", "1_000", "inf", "-Infinity", "1e3", "12345678901234567890"]
BOOLEANS = ["True", "False", "true", "FALSE", "TRUE", "false"]  # pandas: booleans


@pytest.mark.parametrize(("cells", "answers"), [
    (NULL_WORDS, NULL_WORDS), (NUMBERS, NUMBERS), (INTEGERS, INTEGERS), (NUMBER_LIKE, NUMBER_LIKE),
    (BOOLEANS, BOOLEANS),
    (['"None"', '"1,000"', '" spaced "', '"say ""NA"""'], ["None", "1,000", " spaced ", 'say "NA"']),  # CSV quoting
], ids=["null-words", "numbers", "integers", "number-like", "booleans", "quoted"])
def test_csv_answers_are_the_files_text(tmp_path, cells, answers):
    """pandas' guessing made None/NA/null/nan nulls (the file refused: "is null ('None') in 20 of 30
    rows") and rewrote 007, 0.50, 1e3, 02139 as 7.0, 0.5, 1000.0, 2139.0: training saw other answers."""
    from ds_bilevel.data import read_file_or_hub

    path = csv_file(tmp_path / "answers.csv", "prompt,response",
                    [f"question {i},{cells[i % len(cells)]}" for i in range(30)])
    expected = [{"prompt": f"question {i}", "response": answers[i % len(answers)]} for i in range(30)]
    assert all_rows(path, DataConfig(eval_size=3)) == expected
    tokenizer = load_tokenizer("builtin:tiny-llama")
    records = read_file_or_hub(path, DataConfig())
    labels = tokenize(records, tokenizer, DataConfig(max_length=512))["labels"]
    for answer, row in zip([answers[i % len(answers)] for i in range(30)], labels, strict=True):
        assert [t for t in row if t != IGNORE_INDEX] == tokenizer(answer, add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id]


def test_the_reviewers_csv_files_read_as_written(tmp_path):
    """The review's two files: a prompt with commas in quotes, answers None/NA/4; answers 007 0.50 1e3 02139."""
    from ds_bilevel.data import read_file_or_hub

    prompts = ["Is there a prime among 4, 6, 8? Answer with the prime or None.", "Abbreviation for not applicable?",
               "What is 2+2?"]
    path = csv_file(tmp_path / "answers.csv", "prompt,response",
                    [f'"{p}",{r}' for p, r in zip(prompts, ["None", "NA", "4"], strict=True)] * 10)
    records = read_file_or_hub(path, DataConfig())
    assert records[:3] == {"prompt": prompts, "response": ["None", "NA", "4"]}
    assert sorted(set(records["response"])) == ["4", "NA", "None"] and len(records) == 30
    path = csv_file(tmp_path / "numbers.csv", "prompt,response",
                    [f"q{i},{r}" for i, r in enumerate(["007", "0.50", "1e3", "02139"] * 5)])
    assert read_file_or_hub(path, DataConfig())["response"] == ["007", "0.50", "1e3", "02139"] * 5


@pytest.mark.parametrize(("labels", "names", "responses", "classes"), [
    (["False", "True"], [], ["False", "True"], ["False", "True"]),  # names, not booleans
    (["True", "False"], ["True", "False"], ["True", "False"], ["True", "False"]),  # in label_names order
    (["0", "1"], ["neg", "pos"], ["neg", "pos"], ["neg", "pos"]),  # integers: class ids, named
    (["0", "1", "2"], [], ["0", "1", "2"], ["0", "1", "2"]),
    (["pos", "neg", "007"], [], ["pos", "neg", "007"], ["007", "neg", "pos"]),  # one text label: all are names
    (["0.0", "1.0"], [], ["0.0", "1.0"], ["0.0", "1.0"]),
    (["NA", "None"], [], ["NA", "None"], ["NA", "None"]),
], ids=["bool-words", "bool-named", "ints-named", "ints", "mixed", "floats", "null-words"])
def test_csv_labels(tmp_path, labels, names, responses, classes):
    from ds_bilevel.data import class_labels

    path = csv_file(tmp_path / "cls.csv", "text,label", [f"item {i},{labels[i % len(labels)]}" for i in range(30)])
    config = DataConfig(format="classification", eval_size=3, label_names=names)
    rows = all_rows(path, config)
    assert [row["response"] for row in rows] == [responses[i % len(responses)] for i in range(30)]
    integers = all(label.isdigit() for label in labels)
    assert [row["label"] for row in rows] == [int(x) if integers else x for x in (labels * 30)[:30]]
    assert class_labels(config, Dataset.from_list(rows)) == classes


@pytest.mark.parametrize(("header", "row", "message"), [
    ("prompt,response", "question 5,", "data.response_field: 'response' in {path} is an empty cell in 3 of 30 rows "
     "(first at row 6, counting from 1); allowed: text (a string) in every row"),
    ("prompt,response", ',"answer 5"', "data.prompt_field: 'prompt' in {path} is an empty cell in 3 of 30 rows "
     "(first at row 6, counting from 1); allowed: text (a string) in every row"),
    ("text,label", "item 5,", "data.label_field: 'label' in {path} is an empty cell in 3 of 30 rows (first at row "
     "6, counting from 1); allowed: a label (an integer class id or a string) in every row"),
    ("text,label", '"",1', "data.text_field: 'text' in {path} is an empty cell in 3 of 30 rows (first at row 6, "
     "counting from 1); allowed: text (a string) in every row"),
], ids=["response", "prompt", "label", "text-quoted-empty"])
def test_an_empty_csv_cell_in_a_used_field_is_refused(tmp_path, header, row, message):
    fill = "question {i},answer {i}" if header.startswith("prompt") else "item {i},{j}"
    rows = [row if i in (5, 15, 25) else fill.format(i=i, j=i % 2) for i in range(30)]
    path = csv_file(tmp_path / "gaps.csv", header, rows)
    config = DataConfig(format="instruction" if header.startswith("prompt") else "classification", eval_size=3)
    with pytest.raises(ValueError) as refused:
        load_records(path, config, seed=0)
    assert str(refused.value) == message.format(path=path)


def test_an_empty_cell_in_an_unused_csv_column_is_kept(tmp_path):
    path = csv_file(tmp_path / "extra.csv", "prompt,note,response", [f"q {i},,{i:03d}" for i in range(20)])
    assert [row["response"] for row in all_rows(path, DataConfig(eval_size=2))] == [f"{i:03d}" for i in range(20)]


def test_json_jsonl_and_parquet_keep_their_types(tmp_path):
    """Only CSV changed: a JSON file's strings stay strings, its null and numbers are refused, its
    integer labels are class ids; Parquet's columns as stored."""
    answers = ["None", "NA", "007", "1e3", "True"]
    rows = [{"prompt": f"q {i}", "response": answers[i % 5], "label": i % 2} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    expected = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    assert all_rows(str(path), DataConfig(eval_size=2)) == expected
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert all_rows(str(tmp_path / "d.json"), DataConfig(eval_size=2)) == expected
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    assert all_rows(str(tmp_path / "d.parquet"), DataConfig(eval_size=2)) == expected
    classes = all_rows(str(path), DataConfig(format="classification", text_field="prompt", eval_size=2))
    assert [row["label"] for row in classes] == [i % 2 for i in range(20)]
    for changed, refused in ([{3: None}, r"null \('None'\) in 1 of 20 rows \(first at row 4,"],
                             [{5: 7, 9: 1.5}, r"a number \('7'\) in "]):  # (a mixed column goes through pandas)
        path.write_text("\n".join(json.dumps({**row, "response": changed.get(i, row["response"])})
                                  for i, row in enumerate(rows)))
        with pytest.raises(ValueError, match=r"^data.response_field: 'response' in .* is " + refused):
            load_records(str(path), DataConfig(eval_size=2), seed=0)


# ---- data.max_length cuts the text, never the special tokens a model reads; and says so -------------
def bert_like_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "even"]
    return BertTokenizer(vocab={word: i for i, word in enumerate(words)})


def test_a_long_classifier_text_keeps_its_closing_token():
    """A text longer than max_length lost its [SEP] / EOS (ids[:max_length]); HF's truncation
    cuts the text and keeps the special tokens, and so does tokenize now."""
    records = Dataset.from_list([{"prompt": "a b even a b even", "response": "yes", "label": "yes"},
                                 {"prompt": "a", "response": "no", "label": "no"}])
    config = DataConfig(format="classification", max_length=4)
    rows = tokenize(records, bert_like_tokenizer(), config, labels=["no", "yes"]).to_list()
    assert rows == [{"input_ids": [2, 5, 6, 3], "labels": 1}, {"input_ids": [2, 5, 3], "labels": 0}]
    builtin = load_tokenizer("builtin:tiny-llama")  # BOS text, EOS appended
    full = builtin("a b even a b even").input_ids
    ids = tokenize(records, builtin, config, labels=["no", "yes"])[0]["input_ids"]
    assert ids == full[:3] + [builtin.eos_token_id]
    assert ids[0] == builtin.bos_token_id and len(ids) == 4


def test_a_bart_classifier_reads_a_cut_text():
    """BART's sequence classifier reads the EOS position of every text: a cut text without EOS in a
    batch raised "All examples must have the same number of <eos> tokens"."""
    import torch
    import transformers

    tokenizer = load_tokenizer("builtin:tiny-llama")
    config = transformers.BartConfig(vocab_size=len(tokenizer), pad_token_id=3, eos_token_id=2, bos_token_id=1,
                                     decoder_start_token_id=2, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, num_labels=2)
    records = Dataset.from_list([{"prompt": "a long text " * 10, "response": "yes", "label": "yes"},
                                 {"prompt": "short", "response": "no", "label": "no"}])
    rows = tokenize(records, tokenizer, DataConfig(format="classification", max_length=8), labels=["no", "yes"])
    batch = collate(list(rows), pad_id=3)
    with torch.no_grad():
        logits = transformers.BartForSequenceClassification(config).eval()(**batch).logits
    assert logits.shape == (2, 2)


def test_a_cut_prompt_keeps_its_bos():
    """The prompt was cut from the left, BOS first: a LLaMA model then saw a sequence without the BOS
    it always starts with. Now the prompt is cut after BOS; the answer and EOS are kept whole."""
    tokenizer = load_tokenizer("builtin:tiny-llama")
    prompt = "add 12 and 34 and 56 and 78 and 90"
    records = Dataset.from_list([{"prompt": prompt, "response": "260"}])
    full_prompt = tokenizer(prompt + "\n").input_ids
    answer = tokenizer("260", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    max_length = len(answer) + 5
    assert len(full_prompt) > 5  # the prompt is cut
    row = tokenize(records, tokenizer, DataConfig(max_length=max_length))[0]
    assert row["input_ids"] == [tokenizer.bos_token_id] + full_prompt[-4:] + answer
    assert row["labels"] == [IGNORE_INDEX] * 5 + answer
    # An answer longer than max_length - 1: BOS, then the answer's start (its end and EOS are lost).
    records = Dataset.from_list([{"prompt": "q", "response": prompt}])
    row = tokenize(records, tokenizer, DataConfig(max_length=4))[0]
    kept = tokenizer(prompt, add_special_tokens=False).input_ids[:3]
    assert row == {"input_ids": [tokenizer.bos_token_id] + kept, "labels": [IGNORE_INDEX] + kept}


def test_the_cuts_are_counted():
    from ds_bilevel.data import Truncation, tokenize_counting, truncation_warning

    tokenizer = load_tokenizer("builtin:tiny-llama")
    long_text = "add 12 and 34 and 56 and 78 and 90"
    records = Dataset.from_list([{"prompt": "q", "response": "a"}, {"prompt": long_text, "response": "a"},
                                 {"prompt": "q", "response": long_text}, {"prompt": long_text, "response": long_text}])
    lengths = [len(tokenizer(r["prompt"] + "\n").input_ids) + len(tokenizer(r["response"], add_special_tokens=False)
                                                                    .input_ids) + 1 for r in records]
    config = DataConfig(max_length=10)
    assert lengths[0] <= 10 < min(lengths[1:])
    rows, truncation = tokenize_counting(records, tokenizer, config)
    assert truncation == Truncation(examples=4, cut=3, answers_cut=2, longest=max(lengths))
    assert rows.column_names == ["input_ids", "labels"] and rows.to_list() == tokenize(records, tokenizer,
                                                                                        config).to_list()
    evaluation = tokenize_counting(records.select([0, 1]), tokenizer, config)[1]
    assert truncation_warning(10, {"training": truncation, "evaluation": evaluation}) == (
        f"data.max_length 10 cut 3 of 4 training examples (2 of them lost the end of their answer), 1 of 2 "
        f"evaluation examples; the longest is {max(lengths)} tokens; raise data.max_length to keep them whole")
    whole = tokenize_counting(records, tokenizer, DataConfig(max_length=max(lengths)))[1]
    assert whole.cut == 0 and truncation_warning(max(lengths), {"training": whole}) is None
    classes = Dataset.from_list([{"prompt": "a b even a b even", "response": "yes", "label": "yes"},
                                 {"prompt": "a", "response": "no", "label": "no"}])
    counted = tokenize_counting(classes, bert_like_tokenizer(), DataConfig(format="classification", max_length=4),
                                ["no", "yes"])[1]
    assert counted == Truncation(examples=2, cut=1, answers_cut=0, longest=8)


@pytest.mark.parametrize("max_length", [10, 64])
def test_truncation_is_said_once_before_training(tmp_path, capsys, monkeypatch, max_length):
    """prepare() says what data.max_length cut in one warning line (rank 0), and nothing when
    nothing is cut (the builtin task at the default 64: its longest example has 18 tokens)."""
    from ds_bilevel.config import RunConfig
    from ds_bilevel.preparation import prepare

    monkeypatch.setenv("RANK", "0")
    run = RunConfig(output_dir=str(tmp_path / "run"))
    run.data.train_size, run.data.eval_size, run.data.max_length = 32, 8, max_length
    tokenizer = load_tokenizer(run.model_name_or_path)
    train, evaluation = load_records(run.dataset, run.data, run.seed)

    def lengths(records):
        return [len(tokenizer(r["prompt"] + "\n").input_ids)
                + len(tokenizer(r["response"], add_special_tokens=False).input_ids) + 1 for r in records]

    capsys.readouterr()
    prepare(run)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: data.max_length")]
    cut = {name: sum(n > max_length for n in lengths(records))
           for name, records in (("training", train), ("evaluation", evaluation))}
    if max_length == 64:
        assert cut == {"training": 0, "evaluation": 0} and warnings == []
        return
    longest = max(lengths(train) + lengths(evaluation))
    assert cut["training"] and cut["evaluation"]  # the builtin's answers are short: none loses its end
    assert warnings == [f"warning: data.max_length 10 cut {cut['training']} of 32 training examples, "
                        f"{cut['evaluation']} of 8 evaluation examples; the longest is {longest} tokens; raise "
                        f"data.max_length to keep them whole"]
    monkeypatch.setenv("RANK", "1")
    prepare(run)
    assert "data.max_length" not in capsys.readouterr().err
