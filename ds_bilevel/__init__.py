"""ds_bilevel: bi-level low-rank adaptation of large language models on DeepSpeed."""

__version__ = "0.1.0"
