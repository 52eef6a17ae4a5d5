"""Benchmarks of ds_bilevel: speed and memory against HF PEFT, the cost of each method, ZeRO-3
scaling, LLaMA-scale runs (``python -m bench --help``; results in bench/results/, docs/benchmarks.md)."""
