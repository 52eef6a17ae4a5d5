"""One BiDoRA darts step of the LLaMA-2-7B-shaped builtin under ZeRO-3 on 2 CPU ranks.

    python -m bench scale7b          # about 13 minutes of 2 cores and 9 GB per rank

The run of docs/usage.md ("LLaMA-scale"): ``builtin:llama-2-7b-shape`` (6.7B random parameters,
13.5 GB in bf16) built partitioned, one inner and one darts outer step (4 passes), micro batch 1,
at most 32 tokens. The DeepSpeed config is cpu_zero3.json with stage3_max_live_parameters 3e8
and stage3_prefetch_bucket_size 5e7 (written next to the run). Reports each rank's peak memory,
the step's time and the wall time including building the model.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import RUNS, derived_ds_config, machine, save, train

ARGS = ["--model_name_or_path", "builtin:llama-2-7b-shape", "--method", "bidora", "--hypergrad", "darts",
        "--max_steps", "1", "--micro_batch_size", "1", "--gradient_accumulation_steps", "1", "--data.train_size", "16",
        "--data.eval_size", "2", "--data.max_length", "32", "--eval_batch_size", "1", "--eval_steps", "0"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale7b", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks the 7B-shaped model is partitioned over")
    options = parser.parse_args(argv)
    info = machine()
    start = time.perf_counter()
    config = derived_ds_config("ds_configs/cpu_zero3.json", RUNS / "scale7b_config",
                               {"stage3_max_live_parameters": 3e8, "stage3_prefetch_bucket_size": 5e7})
    args = ["--ds_config", config, *ARGS]
    result = train(args, RUNS / "scale7b", options.ranks, timed=False, timeout=4 * 3600)
    result.update(wall_s=time.perf_counter() - start, ranks=options.ranks, train_args=args,
                  loadavg_end=[round(x, 2) for x in os.getloadavg()])
    path = save("scale7b", {"machine": info, **result})
    print(f"peak memory per rank {result['peak_memory_gb_per_rank']} GiB, step {result['train_time_s']:.0f} s, "
          f"wall {result['wall_s']:.0f} s\nresults: {path}")
