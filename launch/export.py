"""Export a finished training run as a merged HF model or a PEFT adapter (docs/export.md).

    python launch/export.py --checkpoint_dir runs/demo --output_dir exports/demo --format merged

A bad setting prints one line naming it and exits with code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The export needs no accelerator; keep deepspeed (imported by nothing here, but by plugins
# that may be) from probing for one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line and exit code 2, like every other bad setting."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="Export a ds_bilevel run as a merged HF model or a PEFT adapter.")
    parser.add_argument("--checkpoint_dir", required=True,
                        help="the run folder (output_dir of launch/train.py) with adapter_model.safetensors")
    parser.add_argument("--output_dir", required=True, help="the folder to write; must not exist or be empty")
    parser.add_argument("--format", default="merged",
                        help="merged: an HF model with the adapters folded in; peft: a PEFT adapter folder")
    parser.add_argument("--dtype", default=None,
                        help="bfloat16 | float16 | float32 (default: bfloat16 for merged, float32 for peft)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest weight file, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--base_model", default=None,
                        help="the base model folder, when it is no longer where the run's run_config.json says")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ds_bilevel.export import DEFAULT_DTYPE, export

    try:
        out = export(args.checkpoint_dir, args.output_dir, args.format, args.dtype, args.overwrite,
                     args.max_shard_size, args.base_model)
    except ValueError as error:  # ExportError, and the run's own settings checks
        print(f"error: {error}", file=sys.stderr)
        return 2
    dtype = args.dtype or DEFAULT_DTYPE.get(args.format)
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"exported {args.checkpoint_dir} as {args.format} ({dtype}) to {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
