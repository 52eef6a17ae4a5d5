"""The invariance matrix: runs that must all end where the one-process reference ends.

Six factors a user can set: the method (with its hypergradient), the ZeRO stage, the
world size, the gradient accumulation, the precision and activation checkpointing. Their full
product (9 x 6 x 2 x 3 x 2 x 2 = 1296 runs) is too slow for CI on 2 cores, so ``ROWS`` is a covering set in which every
pair of values of any two factors occurs at least once (pairwise), and every (method, stage)
pair occurs at least once in fp32, where the comparison is exact to float rounding.
docs/design.md lists the rows; ``uncovered_pairs`` is tested to be empty.

Run under the deepspeed launcher (one launch per world size): trains every row of this world
size through the real TrainingRecipe, one run after another in this process group, and saves
each run's adapters under OUT/<row name>/. tests/test_engine.py compares them with the
plain-PyTorch reference (ds_bilevel.reference.run_reference), which depends only on the method
and the global batch.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

METHODS = {  # name -> settings; shared settings below
    "lora": {"adapter.method": "lora"},
    "dora": {"adapter.method": "dora"},
    "bilora-darts": {"adapter.method": "bilora", "bilevel.hypergrad": "darts"},
    "bidora-first_order": {"adapter.method": "bidora", "bilevel.hypergrad": "first_order"},
    "bidora-darts": {"adapter.method": "bidora", "bilevel.hypergrad": "darts", "adapter.direction_orth_weight": 0.01},
    "bidora-neumann": {"adapter.method": "bidora", "bilevel.hypergrad": "neumann", "bilevel.neumann_terms": 2,
                       "bilevel.unroll_steps": 2},
    "bidora-cg": {"adapter.method": "bidora", "bilevel.hypergrad": "cg", "bilevel.cg_steps": 2},
    "bilora_sam": {"adapter.method": "bilora_sam", "adapter.rho": 0.02},
    "bidora-retrain": {"adapter.method": "bidora", "bilevel.hypergrad": "darts", "bilevel.retrain_steps": 2},
}
# Reference-only cases: what a second-order method would collapse to (issue 12's bug: darts
# silently first-order). The test checks the second-order runs are far from these.
FIRST_ORDER_OF = {"bilora-darts": "bilora-first_order", "bidora-darts": "bidora-first_order",
                  "bidora-neumann": "bidora-first_order", "bidora-cg": "bidora-first_order",
                  "bidora-retrain": "bidora-retrain-first_order"}
REFERENCE_ONLY = {"bilora-first_order": {"adapter.method": "bilora", "bilevel.hypergrad": "first_order"},
                  "bidora-retrain-first_order": {**METHODS["bidora-retrain"], "bilevel.hypergrad": "first_order"}}
OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
STAGES = {
    "stage0": {"stage": 0},
    "stage1": {"stage": 1},
    "stage2": {"stage": 2},
    # DeepSpeed's default persistence threshold (1e5): every adapter factor (and this small base)
    # stays gathered between forwards, as adapters of a LLaMA layer at r=16 do.
    "stage3": {"stage": 3},
    # Threshold 0: every tensor really partitioned.
    "stage3_partitioned": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "stage3_offload": {"stage": 3, "stage3_param_persistence_threshold": 0, **OFFLOAD},
}
# Rows at these stages train with the loss computed inside the output head (linear_cross_entropy,
# loss_head.py): the head's weight is partitioned there (threshold 0) and offloaded, so these rows
# prove it is gathered for the loss's forward and again for its backward. The reference computes
# the loss from the logits: the two are equal to fp32 rounding.
LINEAR_LOSS_STAGES = ("stage3_offload",)
WORLD_SIZES = (1, 2)
ACCUMULATIONS = (1, 2, 4)
PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = (True, False)  # activation checkpointing: ZeRO-3 gathers for backward differently without it
FACTORS = {"method": tuple(METHODS), "stage": tuple(STAGES), "world": WORLD_SIZES, "accumulation": ACCUMULATIONS,
           "precision": PRECISIONS, "checkpointing": CHECKPOINTING}
SHARED = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 96, "data.eval_size": 8,
          "max_steps": 3, "learning_rate": 5e-3, "warmup_ratio": 0.0, "adapter.rank": 4, "adapter.aux_rank": 2,
          "eval_batch_size": 8, "log_steps": 1, "seed": 3}
GLOBAL_BATCH = 8


def _pairs(row: dict) -> set[tuple]:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(FACTORS, 2)}


def uncovered_pairs(rows: list[dict]) -> set[tuple]:
    """The pairs of factor values that no row holds (empty for a pairwise covering set)."""
    wanted = {((a, x), (b, y)) for a, b in itertools.combinations(FACTORS, 2)
              for x in FACTORS[a] for y in FACTORS[b]}
    return wanted - set().union(*(_pairs(row) for row in rows))


def _greedy_rows() -> list[dict]:
    """Deterministic greedy covering: first every (method, stage) in fp32, each completed with the
    (world, accumulation) that covers most new pairs; then bf16 rows, one per method in turn, each
    with the (stage, world, accumulation) that covers most new pairs, until every pair is covered."""
    rows, covered = [], set()

    def add(method: str, stages, precision: str) -> None:
        options = [{"method": method, "stage": s, "world": w, "accumulation": a, "precision": precision,
                    "checkpointing": c}
                   for s in stages for w in WORLD_SIZES for a in ACCUMULATIONS for c in CHECKPOINTING]
        # Among equals, the shape most LLaMA-scale runs have: more ranks, less accumulation; then
        # alternate activation checkpointing, so that each method runs both ways at several stages.
        best = max(options, key=lambda row: (len(_pairs(row) - covered), row["world"], -row["accumulation"],
                                             row["checkpointing"] == (len(rows) % 2 == 0)))
        rows.append(best)
        covered.update(_pairs(best))

    for method, stage in itertools.product(METHODS, STAGES):
        add(method, (stage,), "fp32")
    for method in itertools.cycle(METHODS):
        if not uncovered_pairs(rows):
            return rows
        add(method, STAGES, "bf16")


ROWS = _greedy_rows()


def matrix_table() -> str:
    """The rows as the markdown table docs/design.md shows (a test keeps the two equal)."""
    lines = ["| method | ZeRO | ranks | accumulation | precision | activation checkpointing |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['stage']} | {r['world']} | {r['accumulation']} | {r['precision']} | "
              f"{'yes' if r['checkpointing'] else 'no'} |" for r in ROWS]
    return "\n".join(lines)


def row_name(row: dict) -> str:
    return (f"{row['method']}-{row['stage']}-w{row['world']}-a{row['accumulation']}-{row['precision']}"
            f"{'' if row['checkpointing'] else '-nockpt'}")


def run_settings(row: dict, output_dir: Path | str) -> dict:
    return {**SHARED, **METHODS[row["method"]], "gradient_accumulation_steps": row["accumulation"],
            "gradient_checkpointing": row["checkpointing"], "linear_cross_entropy": row["stage"] in LINEAR_LOSS_STAGES,
            "micro_batch_size": GLOBAL_BATCH // (row["accumulation"] * row["world"]), "output_dir": str(output_dir)}


def ds_settings(row: dict) -> dict:
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": row["precision"] == "bf16"}, "zero_optimization": STAGES[row["stage"]]}


def main(out: Path, world_size: int) -> None:
    from ds_bilevel.config import config_from_flat
    from ds_bilevel.ds_config import fill_ds_config
    from ds_bilevel.recipe import TrainingRecipe

    for row in ROWS:
        if row["world"] != world_size:
            continue
        run = config_from_flat(run_settings(row, out / row_name(row)))
        recipe = TrainingRecipe(run, fill_ds_config(ds_settings(row), run, world_size))
        recipe.setup()
        recipe.save(recipe.train())
        recipe.cleanup()
    (out / f"done-{world_size}.json").write_text(json.dumps({"world_size": world_size}))


if __name__ == "__main__":
    import deepspeed
    import deepspeed.comm as dist
    import torch

    from ds_bilevel.distributed import release_shm_buffers

    deepspeed.init_distributed()
    main(Path(sys.argv[-1]), dist.get_world_size())
    torch.distributed.barrier()  # no collective after this point
    release_shm_buffers()
