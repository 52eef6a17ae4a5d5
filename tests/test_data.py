import json

import pytest

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
