"""Run under the deepspeed launcher: train every (method, hypergradient) case at every ZeRO
stage (and ZeRO-3 with CPU offload of optimizer and parameters) in fp32 through the real
TrainingRecipe, one run after another in this process group, and save each run's adapters
under OUT/<case>/<stage>/. The test compares them with the
plain-PyTorch reference (ds_bilevel.reference.run_reference)."""

import json
import sys
from pathlib import Path

import torch

from ds_bilevel.config import config_from_flat
from ds_bilevel.distributed import release_shm_buffers
from ds_bilevel.ds_config import fill_ds_config
from ds_bilevel.recipe import TrainingRecipe

CASES = {  # name -> settings; shared settings below
    "lora": {"adapter.method": "lora"},
    "dora": {"adapter.method": "dora"},
    "bilora-first_order": {"adapter.method": "bilora", "bilevel.hypergrad": "first_order"},
    "bilora-darts": {"adapter.method": "bilora", "bilevel.hypergrad": "darts"},
    "bidora-first_order": {"adapter.method": "bidora", "bilevel.hypergrad": "first_order"},
    "bidora-darts": {"adapter.method": "bidora", "bilevel.hypergrad": "darts",
                     "adapter.direction_orth_weight": 0.01},
    "bilora-neumann": {"adapter.method": "bilora", "bilevel.hypergrad": "neumann", "bilevel.neumann_terms": 2},
    "bidora-cg": {"adapter.method": "bidora", "bilevel.hypergrad": "cg", "bilevel.cg_steps": 2,
                  "bilevel.unroll_steps": 2},
    "bilora_sam": {"adapter.method": "bilora_sam", "adapter.rho": 0.02},
    "bidora-retrain": {"adapter.method": "bidora", "bilevel.hypergrad": "first_order", "bilevel.retrain_steps": 2},
}
OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
STAGES = {"stage0": {"stage": 0}, "stage1": {"stage": 1}, "stage2": {"stage": 2},
          "stage3": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "stage3_offload": {"stage": 3, "stage3_param_persistence_threshold": 0, **OFFLOAD}}
SHARED = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 96, "data.eval_size": 8,
          "max_steps": 3, "learning_rate": 5e-3, "warmup_ratio": 0.0, "adapter.rank": 4, "adapter.aux_rank": 2,
          "gradient_accumulation_steps": 2, "eval_batch_size": 8, "log_steps": 1}
GLOBAL_BATCH = 8


def main(out: Path, world_size: int) -> None:
    for name, case in CASES.items():
        for stage, zero in STAGES.items():
            settings = {**SHARED, **case, "micro_batch_size": GLOBAL_BATCH // (2 * world_size),
                        "output_dir": str(out / name / stage)}
            run = config_from_flat(settings)
            ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False},
                  "zero_optimization": zero}
            recipe = TrainingRecipe(run, fill_ds_config(ds, run, world_size))
            recipe.setup()
            recipe.save(recipe.train())
            recipe.cleanup()
    (out / "done.json").write_text(json.dumps({"world_size": world_size}))


if __name__ == "__main__":
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed()
    main(Path(sys.argv[-1]), dist.get_world_size())
    torch.distributed.barrier()  # no collective after this point
    release_shm_buffers()
