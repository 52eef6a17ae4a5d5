"""Run under the deepspeed launcher: step a real TrainingRecipe's engine through the shared step loop
(schedule.run_steps) and record, after every step, which levels' fp32 master weights changed
(bitwise), and the frozen base's checksum at the end. Writes OUT (json) on rank 0."""

import json
import sys

import deepspeed
import torch

from ds_bilevel.config import config_from_flat
from ds_bilevel.distributed import release_shm_buffers
from ds_bilevel.ds_config import fill_ds_config
from ds_bilevel.levels import Level
from ds_bilevel.outputs import base_checksum, level_values
from ds_bilevel.recipe import TrainingRecipe
from ds_bilevel.schedule import events, run_steps

CASES = {
    "bidora-darts-zero3-bf16": ({"adapter.method": "bidora", "bilevel.hypergrad": "darts"}, 3, True),
    "bilora-neumann-zero2-fp32": ({"adapter.method": "bilora", "bilevel.hypergrad": "neumann",
                                   "bilevel.unroll_steps": 2}, 2, False),
    "bilora-cg-zero1-bf16": ({"adapter.method": "bilora", "bilevel.hypergrad": "cg"}, 1, True),
    "bilora_sam-zero3-fp32": ({"adapter.method": "bilora_sam"}, 3, False),
    "bidora-first_order-zero2-bf16": ({"adapter.method": "bidora", "bilevel.hypergrad": "first_order"}, 2, True),
    "bilora-first_order-zero0-bf16": ({"adapter.method": "bilora", "bilevel.hypergrad": "first_order"}, 0, True),
}


def batched_read_errors(engine) -> dict[str, float]:
    """The one-collective reads (full_grads, master_values) against DeepSpeed's per-parameter
    accessors, on the gradients of one more pass (its cycle stays open)."""
    from ds_bilevel.hypergrad import Objective
    from ds_bilevel.zero_access import full_grad, master_value, master_values

    params = engine.params[Level.INNER] + engine.params[Level.OUTER]
    inner, outer = engine.gradients(Objective.INNER)
    one_by_one = [full_grad(p) for p in params]
    masters, masters_one_by_one = master_values(params), [master_value(p) for p in params]
    return {"grad": max((a - b).abs().max().item() for a, b in zip(inner + outer, one_by_one, strict=True)),
            "master": max((a - b).abs().max().item() for a, b in zip(masters, masters_one_by_one, strict=True)),
            "grad_norm": sum(g.norm().item() for g in one_by_one)}


def main(out_path: str) -> None:
    deepspeed.init_distributed()
    results = {}
    for name, (case, stage, bf16) in CASES.items():
        run = config_from_flat({"model_name_or_path": "builtin:micro-llama", "data.train_size": 64,
                                "data.eval_size": 8, "max_steps": 4, "micro_batch_size": 2,
                                "learning_rate": 1e-2, "warmup_ratio": 0.0, "output_dir": f"/tmp/unused-{name}",
                                "adapter.rank": 4, **case})
        ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": bf16},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        recipe = TrainingRecipe(run, fill_ds_config(ds, run, torch.distributed.get_world_size()))
        recipe.setup()
        previous, steps = level_values(recipe.engine.module), []
        schedule = list(events(recipe.engine.mode, run.max_steps, run.bilevel.unroll_steps, run.bilevel.outer_steps))
        for step in run_steps(recipe.engine, recipe.sources, schedule):
            current = level_values(recipe.engine.module)
            changed = {level.value: any(not torch.equal(current[level][n], previous[level][n])
                                        for n in current[level]) for level in Level}
            # The engine keeps the loss on the device.
            steps.append({"kind": step.kind.value, "loss": float(step.loss), **changed})
            previous = current
        results[name] = {"steps": steps, "batched_reads": batched_read_errors(recipe.engine),
                         "base_sha256": base_checksum(recipe.engine.module),
                         "dtype": "bfloat16" if bf16 else "float32", "method": case["adapter.method"]}
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[-1])
    torch.distributed.barrier()  # no collective after this point
    release_shm_buffers()
