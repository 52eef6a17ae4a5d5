import torch

from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.builtin.task import SKILLS, corpus_for_tokenizer, make_split
from ds_bilevel.builtin.tokenizer import (
    TOKENIZER_DIR,
    VOCAB_SIZE,
    load_builtin_tokenizer,
    train_tokenizer_model,
)


def test_shipped_tokenizer_is_reproducible_from_the_project_text():
    rebuilt = train_tokenizer_model(corpus_for_tokenizer())
    assert rebuilt == (TOKENIZER_DIR / "tokenizer.model").read_bytes()


def test_tokenizer_round_trips_task_text():
    tokenizer = load_builtin_tokenizer()
    assert 256 < len(tokenizer) <= VOCAB_SIZE  # byte fallback + merges; a soft limit
    for example in make_split(seed=1, size=40):
        ids = tokenizer(example["prompt"], add_special_tokens=False).input_ids
        assert ids and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == example["prompt"]


def test_task_is_deterministic_and_correct():
    assert make_split(seed=5, size=50) == make_split(seed=5, size=50)
    assert make_split(seed=5, size=50) != make_split(seed=6, size=50)
    examples = make_split(seed=0, size=400)
    assert {e["skill"] for e in examples} == set(SKILLS)
    for e in examples:
        if e["skill"] == "parity":
            number = int(e["prompt"].split()[1])
            assert e["response"] == ("even" if number % 2 == 0 else "odd")
        if e["skill"] == "larger":
            a, b = (int(w.strip(",?")) for w in e["prompt"].split()[3::2])
            assert e["response"] == str(max(a, b))


def test_builtin_model_is_seeded_and_small():
    a = build_builtin_model("builtin:tiny-llama", VOCAB_SIZE, seed=0)
    b = build_builtin_model("builtin:tiny-llama", VOCAB_SIZE, seed=0)
    c = build_builtin_model("builtin:tiny-llama", VOCAB_SIZE, seed=1)
    assert 2e6 < sum(p.numel() for p in a.parameters()) < 1e7
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert type(a).__name__ == "LlamaForCausalLM"
