"""One process, many fine-tunes: the generalisation study's runs (bench/generalisation.py) without a
launcher per run.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/generalisation_worker.py JOBS.json

JOBS.json is {"deadline": epoch seconds or null, "jobs": [{"argv": launch/train.py's flags,
"test_file": a JSONL, "result": a path}, ...]}; past the deadline no job is started.
Each job runs launch/train.py's own validation (``validated_settings``) and ``TrainingRecipe`` in
this process as one rank (a launcher and a fresh interpreter per run cost ~15 s, more than a
run's training here). The recipe's evaluation set is the run's validation split: the held-out
share of the training file (``--data.eval_size``), noisy like the rest of it, never in D1 or D2.
``StudyRecipe`` also scores the clean test file at every evaluation, so that the step with the
best validation accuracy (the best checkpoint, i.e. early stopping) can be read off the curve
without saving checkpoints. Nothing is exported: the recipe's evaluation is the export's
(tested in tests/test_export*.py). A job whose result file exists is skipped; a failing job is
recorded with its error and the next one runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from bench.common import train_entry  # noqa: E402
from ds_bilevel.recipe import TrainingRecipe  # noqa: E402


class StudyRecipe(TrainingRecipe):
    """The recipe, with the clean test set scored next to the validation set at every evaluation."""

    def __init__(self, run, ds_config, test_file: str):
        super().__init__(run, ds_config)
        self.test_file, self.curve = test_file, []

    def setup(self) -> None:
        from ds_bilevel.data import read_file_or_hub, tokenize
        from ds_bilevel.models import encoder_labels

        super().setup()
        records = read_file_or_hub(self.test_file, self.run.data, "test_file")
        labels = encoder_labels(self.run.model_name_or_path, False, self.run.data, records)
        self.test_set = tokenize(records, self.tokenizer, self.run.data, labels)

    def _evaluate(self, step: int) -> dict:
        from ds_bilevel.evaluation import evaluate

        metrics = super()._evaluate(step)
        test = evaluate(self.engine, self.test_set, self.tokenizer.pad_token_id, self.run.eval_batch_size)
        self.curve.append({"step": step, "val_loss": metrics["eval_loss"], "val_acc": accuracy(metrics),
                           "test_loss": test["eval_loss"], "test_acc": accuracy(test)})
        return metrics


def accuracy(metrics: dict) -> float:
    """A classifier's accuracy or a causal LM's exact match (the label word, then end-of-sequence)."""
    return metrics.get("eval_accuracy", metrics.get("eval_exact_match"))


def run_job(job: dict) -> dict:
    """One fine-tune: its validation/test curve and timing."""
    entry = train_entry()
    started = time.perf_counter()
    # The recipe's progress bars and lines are for a terminal: a study prints one line per run.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run, ds_config = entry.validated_settings(job["argv"])
        recipe = StudyRecipe(run, ds_config, job["test_file"])
        recipe.setup()
        trained = recipe.train()
        recipe.cleanup()
    shutil.rmtree(run.output_dir, ignore_errors=True)  # nothing of a study run is kept but its curve
    return {"curve": recipe.curve, "train_time_s": trained["train_time_s"], "wall_s": time.perf_counter() - started,
            "train_loss_last": trained["train_loss_last"], "nonfinite_steps": trained["nonfinite_steps"]}


def main(argv: list[str]) -> int:
    entry = train_entry()
    entry.prepare_process()  # the accelerator and the known noise, before deepspeed is imported
    plan = json.loads(Path(argv[0]).read_text())
    for job in plan["jobs"]:
        result = Path(job["result"])
        if result.is_file():
            continue
        if plan["deadline"] is not None and time.time() > plan["deadline"]:
            print("past the time budget: no more runs", flush=True)
            break
        try:
            row = run_job(job)
        except Exception as error:  # recorded; the next job still runs
            traceback.print_exc()
            row = {"failed": True, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.rename(result)
        print(f"{result.stem}: " + ("failed" if row.get("failed") else f"{row['wall_s']:.1f} s"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
