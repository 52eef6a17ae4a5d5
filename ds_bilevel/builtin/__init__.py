"""The embedded default: a tiny LLaMA-architecture model, its sentencepiece tokenizer and
a synthetic instruction task, all made by the project (no download)."""
