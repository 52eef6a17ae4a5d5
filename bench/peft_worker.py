"""The peer: HF PEFT's LoRA or DoRA trained through ``deepspeed.initialize``, timed like ours.

    python -m deepspeed.launcher.runner --num_gpus 2 bench/peft_worker.py --peft_method lora [train.py flags]

Takes launch/train.py's flags (the same RunConfig), so model, data, batch order, DeepSpeed
config (ZeRO stage, bf16, clipping, accumulation), learning-rate schedule, rank, alpha and
target modules are those of ds_bilevel's run. The loop is PEFT's idiom: ``get_peft_model``,
a torch AdamW over the trainable parameters, then per micro-batch
``loss = engine(input_ids, attention_mask, labels).loss; engine.backward(loss); engine.step()``.
Prints one JSON line: steady tokens/s after the warm-up steps and each rank's peak memory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launcher


def peft_model(run, method: str, ds_config: dict, vocab_size: int):
    from peft import LoraConfig, get_peft_model

    from ds_bilevel.models import load_model

    model = load_model(run.model_name_or_path, vocab_size, run.seed, ds_config=ds_config)
    model.config.use_cache = False
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # PEFT takes the all-linear default as a string (a list would name a module called "all-linear"):
    # both then adapt the same layers, every linear layer but lm_head.
    targets = run.adapter.target_modules
    config = LoraConfig(r=run.adapter.rank, lora_alpha=run.adapter.alpha, lora_dropout=run.adapter.dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                        use_dora=method == "dora",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def peft_training(run, method: str, world_size: int, rank: int):
    """PEFT's model trained through ``deepspeed.initialize`` (torch AdamW, transformers' schedule)
    and the same batches as ours: (engine in train mode, BatchSource). bench/step_ops.py uses it too."""
    import deepspeed
    import torch
    from transformers import get_scheduler

    from ds_bilevel.data import load_records, tokenize
    from ds_bilevel.ds_config import fill_ds_config, read_ds_config
    from ds_bilevel.models import load_tokenizer
    from ds_bilevel.schedule import BatchSource

    ds_config = fill_ds_config(read_ds_config(run.ds_config), run, world_size)
    torch.manual_seed(run.seed)
    tokenizer = load_tokenizer(run.model_name_or_path)
    train_set = tokenize(load_records(run.dataset, run.data, run.seed)[0], tokenizer, run.data)
    model = peft_model(run, method, ds_config, len(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate,
                                  weight_decay=run.weight_decay)
    scheduler = get_scheduler(run.lr_scheduler, optimizer, int(run.warmup_ratio * run.max_steps), run.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    source = BatchSource(train_set, list(range(len(train_set))), run.global_batch_size(world_size),
                         run.micro_batch_size, rank, world_size, run.seed, tokenizer.pad_token_id)
    engine.train()
    return engine, source


def main(argv: list[str]) -> None:
    import deepspeed
    import deepspeed.comm as dist

    from ds_bilevel.config import load_config
    from ds_bilevel.distributed import destroy_engine, release_shm_buffers
    from ds_bilevel.outputs import peak_memory_per_rank

    method, warmup = argv[argv.index("--peft_method") + 1], int(argv[argv.index("--warmup") + 1])
    argv = [a for i, a in enumerate(argv) if a not in ("--peft_method", "--warmup")
            and argv[i - 1] not in ("--peft_method", "--warmup")]
    run = load_config(argv)
    deepspeed.init_distributed()
    rank = dist.get_rank()
    engine, source = peft_training(run, method, int(os.environ.get("WORLD_SIZE", "1")), rank)
    tokens, start = 0, None
    for step in range(run.max_steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        batch = source.batch(step)
        for micro in batch.micro_batches:
            micro = {key: value.to(engine.device) for key, value in micro.items()}
            loss = engine(**micro).loss
            engine.backward(loss)
            engine.step()
        tokens += batch.tokens
    seconds = time.perf_counter() - start
    peak = peak_memory_per_rank()
    if rank == 0:
        print(json.dumps({"tokens_per_s": tokens / seconds, "s_per_step": seconds / (run.max_steps - warmup),
                          "timed_steps": run.max_steps - warmup, "peak_memory_gb_per_rank": peak,
                          "last_loss": loss.item()}))
    dist.barrier()
    destroy_engine(engine)  # bench/gpu_worker.py runs the next configuration in this process: free the model
    release_shm_buffers()


if __name__ == "__main__":
    main(sys.argv[1:])
