"""Run under the deepspeed launcher: the per-level settings of issue 14 (AdamW betas and eps,
BiDoRA's retraining learning rate, weight decay and warm-up, the outer level's own gradient
clipping) through a real TrainingRecipe's engine. Records, for every case, what the optimizer and
DeepSpeed hold at each step and the final adapters; writes OUT (json + one safetensors per case)
on rank 0. tests/test_level_settings.py compares them with the plain-PyTorch reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHARED = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 48, "data.eval_size": 8,
          "max_steps": 2, "learning_rate": 5e-3, "warmup_ratio": 0.0, "adapter.rank": 4, "seed": 3,
          "adapter.method": "bidora", "bilevel.hypergrad": "first_order", "adapter.target_modules": "q_proj,v_proj"}
GLOBAL_BATCH = 8
ADAM = {"adam_beta1": 0.8, "adam_beta2": 0.98, "adam_epsilon": 1e-6}
RETRAIN = {"weight_decay": 0.01, "bilevel.retrain_steps": 2, "bilevel.retrain_learning_rate": 1e-2,
           "bilevel.retrain_weight_decay": 0.2, "bilevel.retrain_warmup_ratio": 0.5}
# Both clips bind on this problem (the gradients' norms are larger), at different values per level.
CLIP = {"max_grad_norm": 0.02, "bilevel.outer_max_grad_norm": 0.005}
CASES = {  # name -> (settings, ZeRO stage); each setting at a non-default value
    "all-zero2": ({**ADAM, **RETRAIN, **CLIP, "bilevel.hypergrad": "darts"}, 2),
    # A larger eps makes Adam's step depend on the gradient's scale, so that the clip shows in the weights.
    "clip-zero0": ({**CLIP, "adam_epsilon": 1e-4}, 0),
    "clip-zero3": ({**CLIP, "adam_epsilon": 1e-4}, 3),
}


def settings(name: str) -> dict:
    return {**SHARED, **CASES[name][0]}


def groups(optimizer) -> dict:
    return {g["level"]: {"lr": g["lr"], "weight_decay": g["weight_decay"], "betas": list(g["betas"]),
                         "eps": g["eps"]} for g in optimizer.param_groups}


def clip_value(ds_engine) -> float:
    """The clip DeepSpeed applies at its next step (see ds_bilevel.engine.set_gradient_clipping)."""
    holder = ds_engine.optimizer
    return float(holder.clip_grad if hasattr(holder, "clip_grad") else ds_engine._config.gradient_clipping)


def main(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ds_bilevel.config import config_from_flat
    from ds_bilevel.ds_config import fill_ds_config
    from ds_bilevel.levels import Level
    from ds_bilevel.outputs import level_values
    from ds_bilevel.recipe import TrainingRecipe
    from ds_bilevel.schedule import events, run_steps

    world = torch.distributed.get_world_size()
    results = {}
    for name, (_, stage) in CASES.items():
        run = config_from_flat({**settings(name), "micro_batch_size": GLOBAL_BATCH // (2 * world),
                                "gradient_accumulation_steps": 2, "output_dir": str(out / name)})
        ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        recipe = TrainingRecipe(run, fill_ds_config(ds, run, world))
        recipe.setup()
        engine, record = recipe.engine, {"steps": [], "type": type(recipe.engine.ds_engine.optimizer).__name__}
        start = engine.start_retraining

        def start_retraining(engine=engine, start=start, record=record):
            start()
            record["retraining_start"] = groups(engine.client_optimizer)

        engine.start_retraining = start_retraining
        schedule = list(events(engine.mode, run.max_steps, run.bilevel.unroll_steps, run.bilevel.outer_steps,
                               run.bilevel.retrain_steps))
        for step in run_steps(engine, recipe.sources, schedule):
            record["steps"].append({"kind": step.kind.value, "clip": clip_value(engine.ds_engine),
                                    "groups": groups(engine.client_optimizer)})
        values = level_values(engine.module)
        if torch.distributed.get_rank() == 0:
            save_file({n: t.contiguous() for level in Level for n, t in values[level].items()},
                      str(out / f"{name}.safetensors"))
        results[name] = record
        recipe.cleanup()
    if torch.distributed.get_rank() == 0:
        (out / "records.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    import deepspeed
    import torch

    from ds_bilevel.distributed import release_shm_buffers

    deepspeed.init_distributed()
    main(Path(sys.argv[-1]))
    torch.distributed.barrier()  # no collective after this point
    release_shm_buffers()
