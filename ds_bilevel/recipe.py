"""The life of a training run: setup, train, save, cleanup (torchtune's recipe shape).

Everything here runs after the launcher has validated the settings; the first
distributed call is ``deepspeed.init_distributed`` in ``setup``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ds_bilevel.adapters import inject_adapters
from ds_bilevel.adapters.base import gathered
from ds_bilevel.adapters.inject import named_base_parameters
from ds_bilevel.config import RunConfig, config_to_dict
from ds_bilevel.data import GlobalBatchOrder, collate, load_records, tokenize
from ds_bilevel.engine import BilevelEngine
from ds_bilevel.evaluation import evaluate
from ds_bilevel.levels import Level, named_level_parameters
from ds_bilevel.models import load_model, load_tokenizer

logger = logging.getLogger("ds_bilevel")


def fp32_value(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of a (possibly partitioned) trained parameter.
    A collective under ZeRO: every rank calls it for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return (value if value is not None else param.detach()).float().cpu().clone()


def base_checksum(model: torch.nn.Module) -> str:
    """sha256 over the frozen base's names and bytes, gathered one tensor at a time."""
    digest = hashlib.sha256()
    for name, param in named_base_parameters(model):
        with gathered([param]):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with a frozen base and
    under ZeRO-3 from DeepSpeed 0.19.3; reentrant would need enable_input_require_grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class TrainingRecipe:
    def __init__(self, run: RunConfig, ds_config: dict):
        self.run, self.ds_config = run, ds_config
        self.output_dir = Path(run.output_dir)

    # ---- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import deepspeed.comm as dist

        deepspeed.init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        run = self.run
        torch.manual_seed(run.seed)
        if self.rank != 0:
            import datasets

            datasets.disable_progress_bars()
        self.tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
        train, evaluation = load_records(run.dataset, run.data, run.seed)
        self.train_set = tokenize(train, self.tokenizer, run.data)
        self.eval_set = tokenize(evaluation, self.tokenizer, run.data)
        model = load_model(run.model_name_or_path, len(self.tokenizer), run.seed, run.trust_remote_code)
        model.config.use_cache = False
        if run.gradient_checkpointing:
            # Non-reentrant: works with a frozen base and under ZeRO-3 (DeepSpeed >= 0.19.3).
            enable_activation_checkpointing(model)
        torch.manual_seed(run.seed)  # the same adapter init on every rank
        self.adapted = inject_adapters(model, run.adapter)
        self.engine = BilevelEngine(model, run, self.ds_config)
        self.order = GlobalBatchOrder(len(self.train_set), run.global_batch_size(self.world_size), run.seed)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.json").write_text(json.dumps(config_to_dict(run), indent=2))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            self.metrics_file = (self.output_dir / "metrics.jsonl").open("w")

    # ---- train -----------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> tuple[list[dict], int, int]:
        """This rank's micro-batches of ``step``, and the global batch's (labelled, all) token counts."""
        run, pad = self.run, self.tokenizer.pad_token_id
        global_ids = self.order.global_indices(step)
        labelled = sum(sum(1 for t in self.train_set[i]["labels"][1:] if t >= 0) for i in global_ids)
        tokens = sum(len(self.train_set[i]["input_ids"]) for i in global_ids)
        batches = [collate([self.train_set[i] for i in self.order.micro_indices(
            step, k, self.rank, self.world_size, run.micro_batch_size)], pad)
            for k in range(run.gradient_accumulation_steps)]
        return batches, labelled, tokens

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()

    def _evaluate(self, step: int) -> dict:
        metrics = evaluate(self.engine, self.eval_set, self.tokenizer.pad_token_id, self.run.eval_batch_size)
        self._log({"step": step, **metrics})
        return metrics

    def train(self) -> dict:
        import deepspeed.comm as dist
        from tqdm.auto import tqdm

        run = self.run
        before = self._evaluate(0)
        progress = tqdm(total=run.max_steps, desc="train", disable=self.rank != 0, dynamic_ncols=True)
        tokens_seen, start, losses = 0, time.perf_counter(), []
        for step in range(run.max_steps):
            batches, labelled, tokens = self._micro_batches(step)
            local = torch.tensor([self.engine.train_step(batches, labelled)], dtype=torch.float64)
            dist.all_reduce(local)
            loss = local.item() / labelled
            losses.append(loss)
            tokens_seen += tokens
            elapsed = time.perf_counter() - start
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
            if (step + 1) % run.log_steps == 0 or step + 1 == run.max_steps:
                lr = self.engine.scheduler.get_last_lr()[0]
                self._log({"step": step + 1, "train_loss": loss, "lr": lr,
                           "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed})
            if run.eval_steps and (step + 1) % run.eval_steps == 0 and step + 1 < run.max_steps:
                self._evaluate(step + 1)
        progress.close()
        train_time = time.perf_counter() - start
        after = self._evaluate(run.max_steps)
        return {"eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
                "exact_match_before": before["eval_exact_match"], "exact_match_after": after["eval_exact_match"],
                "train_loss_first": losses[0], "train_loss_last": losses[-1],
                "tokens_per_s": tokens_seen / train_time, "train_time_s": train_time,
                "steps": run.max_steps, "world_size": self.world_size}

    # ---- save ------------------------------------------------------------------------------
    def save(self, summary: dict) -> dict:
        """Write the adapters (fp32 masters, safetensors) and the summary. Collective."""
        from safetensors.torch import save_file

        module = self.engine.module
        tensors = {name: fp32_value(p) for level in Level for name, p in named_level_parameters(module, level)}
        levels = {name: level.value for level in Level for name, _ in named_level_parameters(module, level)}
        if self.run.checksum_base:
            summary["base_sha256"] = base_checksum(module)
        if self.rank == 0:
            save_file(tensors, str(self.output_dir / "adapter_model.safetensors"),
                      metadata={"method": self.run.adapter.method, "levels": json.dumps(levels)})
            summary["output_dir"] = str(self.output_dir.resolve())
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def cleanup(self) -> None:
        import deepspeed.comm as dist

        if self.rank == 0:
            self.metrics_file.close()
        dist.barrier()
