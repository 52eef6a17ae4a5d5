"""The builtin sentencepiece tokenizer: trained by the project on its own task text.

The trained ``tokenizer.model`` is shipped in ``ds_bilevel/builtin/tokenizer/`` (with a
tokenizer_config.json) and loaded with AutoTokenizer like any LLaMA tokenizer.
``python -m ds_bilevel.builtin.tokenizer`` rebuilds it from ``task.corpus_for_tokenizer``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
VOCAB_SIZE = 512
SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer_model(lines: list[str]) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=VOCAB_SIZE, model_type="bpe",
        split_digits=True, byte_fallback=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, minloglevel=2,
    )
    return buffer.getvalue()


def write_tokenizer(folder: Path, model_bytes: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 128, "padding_side": "right", **SPECIAL}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_builtin_tokenizer():
    from transformers import AutoTokenizer

    # AutoTokenizer on the folder, not LlamaTokenizer(vocab_file=...): in transformers 5
    # the latter silently encodes every text to [] (docs/design.md, "Known traps").
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if not tokenizer("a").input_ids[1:]:
        raise RuntimeError(f"builtin tokenizer at {TOKENIZER_DIR} encodes text to nothing")
    return tokenizer


if __name__ == "__main__":
    from ds_bilevel.builtin.task import corpus_for_tokenizer

    write_tokenizer(TOKENIZER_DIR, train_tokenizer_model(corpus_for_tokenizer()))
    print(f"wrote {TOKENIZER_DIR}")
