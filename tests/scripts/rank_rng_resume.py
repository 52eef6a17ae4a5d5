"""Run under the deepspeed launcher (2 ranks): a real TrainingRecipe saves a checkpoint while each
rank's generator is in a state of its own (as after batches of other lengths on a GPU), the
generators are then scrambled, and the recipe resumes. Records on rank 0, for every rank, whether it
got its own state back, and the files of the checkpoint. Writes OUT (json)."""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from ds_bilevel.config import config_from_flat
from ds_bilevel.distributed import release_shm_buffers
from ds_bilevel.ds_config import fill_ds_config
from ds_bilevel.recipe import Progress, TrainingRecipe


def main(out_path: str) -> None:
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    folder = Path(out_path).parent / "run"
    run = config_from_flat({"model_name_or_path": "builtin:micro-llama", "data.train_size": 32, "data.eval_size": 4,
                            "max_steps": 2, "micro_batch_size": 2, "output_dir": str(folder)})
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    recipe = TrainingRecipe(run, fill_ds_config(ds, run, torch.distributed.get_world_size()))
    recipe.setup()
    torch.manual_seed(1000 + rank)
    torch.rand(17 * (rank + 1))  # and advanced by a different amount on each rank
    own = torch.get_rng_state()
    recipe._save_checkpoint(Progress(position=1, inner_done=1))
    torch.manual_seed(0)
    recipe.run.resume_from_checkpoint = "latest"
    recipe._resume(total=2)
    restored = torch.tensor([float(torch.equal(torch.get_rng_state(), own))])
    gathered = [torch.zeros(1) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, restored)
    if rank == 0:
        files = sorted(p.name for p in (folder / "checkpoints" / "step1").iterdir())
        checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
        restored = [bool(t.item()) for t in gathered]
        Path(out_path).write_text(json.dumps({"restored": restored, "files": files, "checkpoints": checkpoints}))
    recipe.cleanup()
    recipe.release()


if __name__ == "__main__":
    main(sys.argv[-1])
    release_shm_buffers()
