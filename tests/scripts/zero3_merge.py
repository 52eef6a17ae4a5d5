"""Run under the deepspeed launcher: merge every adapter of a ZeRO-3 partitioned model.

For each method, the model is adapted, its adapters randomised (the same on every rank),
and wrapped by deepspeed.initialize at stage 3 with every weight partitioned. Rank 0 writes
the largest differences between (a) each layer's merged_linear() and the same layer merged
before partitioning, (b) the engine's logits and the unpartitioned model's logits, and
(c) the partition state after merging (still partitioned: one layer gathered at a time).
"""

import copy
import json
import sys

import deepspeed
import torch

from ds_bilevel.adapters import METHODS, AdapterConfig, inject_adapters
from ds_bilevel.adapters.base import AdapterLayer
from ds_bilevel.builtin.model import build_builtin_model
from ds_bilevel.distributed import release_shm_buffers
from ds_bilevel.levels import Level, level_parameters


def randomised_model(method: str) -> torch.nn.Module:
    model = build_builtin_model("builtin:micro-llama", vocab_size=128, seed=0)
    torch.manual_seed(1)
    inject_adapters(model, AdapterConfig(method=method, rank=4, aux_rank=2))
    with torch.no_grad():
        for level in Level:
            for param in level_parameters(model, level):
                param.add_(torch.randn_like(param) * 0.05)
    return model


def main(out_path: str) -> None:
    deepspeed.init_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for method in METHODS:
        model = randomised_model(method)
        reference = copy.deepcopy(model).eval()
        expected = {name: layer.merged_linear().weight for name, layer in reference.named_modules()
                    if isinstance(layer, AdapterLayer)}
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [AdapterLayer])
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        layers = [(n, m) for n, m in engine.module.named_modules() if isinstance(m, AdapterLayer)]
        weight_error = max((layer.merged_linear().weight - expected[name]).abs().max().item()
                           for name, layer in layers)
        still_partitioned = all(layer.base_layer.weight.numel() == 0 for _, layer in layers)
        with torch.no_grad():
            logits_error = (engine(tokens).logits - reference(tokens).logits).abs().max().item()
        results[method] = {"merged_weight_max_abs_error": weight_error, "logits_max_abs_error": logits_error,
                           "still_partitioned": still_partitioned, "layers": len(layers)}
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[-1])
    torch.distributed.barrier()  # no collective after this point
    release_shm_buffers()
