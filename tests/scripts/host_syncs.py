"""Run under the deepspeed launcher: count the host syncs that ds_bilevel's own code makes in
training steps (issue 13). On a GPU, reading a device tensor on the host (``.item()``,
``float(t)``, ``bool(t)``, ``int(t)``, ``.tolist()``) makes the host wait for every queued
kernel; between micro-batches that stalls the pipeline. Here on CPU the same calls are counted
by patching them, keeping only those made directly by a function of the ds_bilevel package
(DeepSpeed's and torch's own are theirs to answer for). Writes OUT/syncs.json:
{method: {"steps": n, "syncs": [[file:function, count], ...]}}."""

import collections
import json
import sys
from pathlib import Path

import torch

PACKAGE = str(Path(__file__).resolve().parents[2] / "ds_bilevel")
SETTINGS = {"model_name_or_path": "builtin:micro-llama", "data.train_size": 64, "data.eval_size": 8,
            "max_steps": 3, "micro_batch_size": 1, "gradient_accumulation_steps": 4, "adapter.rank": 4,
            "adapter.rho": 0.02}
STEPS = 3


class SyncCounter:
    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self):
        self.calls = collections.Counter()
        self.originals = {name: getattr(torch.Tensor, name) for name in self.NAMES}

    def __enter__(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                self.calls[f"{Path(caller.co_filename).name}:{caller.co_name}"] += 1
            return original(tensor, *args, **kwargs)

        return wrapper


def main(out: Path, world_size: int) -> None:
    from ds_bilevel.config import config_from_flat
    from ds_bilevel.ds_config import fill_ds_config
    from ds_bilevel.recipe import TrainingRecipe

    results = {}
    # name -> (settings, the kinds of one cycle): a bi-level cycle is an inner and an outer step
    cases = {"lora": ({"adapter.method": "lora"}, ("inner",)),
             "bilora_sam": ({"adapter.method": "bilora_sam"}, ("sharpness",)),
             "bidora darts": ({"adapter.method": "bidora", "bilevel.hypergrad": "darts"}, ("inner", "outer")),
             "bidora neumann": ({"adapter.method": "bidora", "bilevel.hypergrad": "neumann",
                                 "bilevel.neumann_terms": 2}, ("inner", "outer"))}
    for name, (settings, kinds) in cases.items():
        run = config_from_flat({**SETTINGS, **settings, "output_dir": str(out / name.replace(" ", "_"))})
        ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2}}
        recipe = TrainingRecipe(run, fill_ds_config(ds, run, world_size))
        recipe.setup()
        # Batches are made first: the data order is host work on host tensors, not a device read.
        cycles = [[(kind, recipe.sources[kind].batch(index)) for kind in kinds] for index in range(1 + STEPS)]
        for kind, batch in cycles[0]:  # warm-up: first-step allocations
            recipe.engine.step(kind, batch)
        with SyncCounter() as counter:
            for cycle in cycles[1:]:
                for kind, batch in cycle:
                    recipe.engine.step(kind, batch)
        results[name] = {"steps": STEPS * len(kinds), "syncs": sorted(counter.calls.items())}
        recipe.cleanup()
    (out / "syncs.json").write_text(json.dumps(results))


if __name__ == "__main__":
    import deepspeed
    import deepspeed.comm as dist

    from ds_bilevel.distributed import release_shm_buffers

    deepspeed.init_distributed()
    main(Path(sys.argv[-1]), dist.get_world_size())
    torch.distributed.barrier()
    release_shm_buffers()
