"""Peak resident memory of one merged export, in a process of its own (tests/test_export.py).

    python export_peak_memory.py RUN_DIR OUTPUT_DIR MAX_SHARD_SIZE DTYPE

Prints one JSON line: the resident set before the export and its peak during it, in bytes.
The peak is Linux's VmHWM, reset just before the export by writing 5 to /proc/self/clear_refs,
so imports and the first-call allocations (done by a warm-up export) are not counted.
"""

import json
import re
import sys
from pathlib import Path

import tqdm.auto  # noqa: F401  (imported by the export; imported here so that it is not measured)

from ds_bilevel.export import export


def status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)[1]) * 1024


def main(run_dir: str, output_dir: str, max_shard_size: str, dtype: str) -> None:
    export(run_dir, output_dir + "-warmup", format="peft")  # tokenizer, readers, writers: all imported
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    export(run_dir, output_dir, format="merged", dtype=dtype, max_shard_size=max_shard_size)
    print(json.dumps({"rss_before": before, "peak": status_bytes("VmHWM")}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
