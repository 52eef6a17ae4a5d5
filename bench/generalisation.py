"""Generalisation study (issue #14): does the bi-level help, once every method is tuned fairly?

    python -m bench generalisation                       # the full study (resumes from its run cache)
    python -m bench generalisation --seeds 1 --tasks decoder --noises 0.25 --max_steps 20   # a smoke run

Two synthetic tasks on bases pre-trained here (bench/generalisation_task.py, cached): sentiment as
the next word of a LLaMA-architecture causal LM ("decoder"), and as the class of a RoBERTa encoder
with a classification head ("encoder", as BiDoRA's GLUE setting). For every seed, label-noise level,
method configuration and learning rate of the grid, one fine-tune (launch/train.py's validation and
recipe, DeepSpeed, one CPU rank, in bench/generalisation_worker.py: many runs per process) on a
data file of n_train + n_val examples with the noise's share of labels flipped:

- the recipe holds out n_val of them as the validation split (noisy like the rest, as a user's
  held-out share is); the bi-level methods split the other n_train into D1 and D2 (split_ratio);
  so validation is neither D1, D2 nor test;
- every eval_steps the run scores the validation split and the clean test set (n_test); the
  reported test accuracy is the one at the step of best validation accuracy (the best checkpoint,
  i.e. early stopping, for every method alike);
- the learning rate of each (task, configuration) is chosen first, on tuning seeds of their own
  (1000, 1001, ...: other examples, other flips) at the tuning noise level: the rate of its grid
  (GRIDS, per configuration) with the best mean validation accuracy. Test labels never choose anything.
  The evaluation seeds (0 .. seeds-1) then run at that rate, at every noise level.

Configurations: the one-level baselines, and the bi-level methods both at the project defaults and
at their paper presets (--preset; bidora_paper with its retraining phase). bilora_sam_paper equals
bilora_sam's defaults in every setting the study sets, so it is one row. The results are
bench/results/generalisation.{json,md,png} (bench/generalisation_report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bench.generalisation_task import (
    CACHE_ROOT,
    WorldConfig,
    make_lexicon,
    make_task,
    pretrained_encoder,
    pretrained_model,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# configuration -> (method, preset or None); the paper presets are ds_bilevel/presets/*.yaml
CONFIGS = {
    "lora": ("lora", None), "dora": ("dora", None),
    "bilora": ("bilora", None), "bilora_paper": ("bilora", "bilora_paper"),
    "bidora": ("bidora", None), "bidora_paper": ("bidora", "bidora_paper"),
    "bilora_sam": ("bilora_sam", None),
}
TASKS = ("decoder", "encoder")
# Learning-rate grids, per configuration: four rates each, placed where a pilot run (seed 0, 25%
# noise, lr 1e-3) showed each family learns: the baselines had peaked by step 40 at 1e-3 (the grid
# reaches down to 1e-4: low rates matched BiLoRA in the first study); BiLoRA's softmax lambda (1/r at
# the start) learns ~r times slower; the presets adapt only q and v, at s = alpha / r = 1 or 2.
# BiLoRA has six: its decoder picks, 1e-2 and then 3e-2, were each the grid's edge, so 3e-2 and 1e-1
# were added (its validation accuracy is flat from 3e-3 to 1e-1: docs/benchmarks.md).
GRIDS = {
    "lora": [1e-4, 3e-4, 1e-3, 3e-3], "dora": [1e-4, 3e-4, 1e-3, 3e-3], "bilora_sam": [1e-4, 3e-4, 1e-3, 3e-3],
    "bilora": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "bidora": [3e-4, 1e-3, 3e-3, 1e-2],
    "bilora_paper": [1e-3, 3e-3, 1e-2, 3e-2], "bidora_paper": [1e-3, 3e-3, 1e-2, 3e-2],
}
TUNING_SEED0 = 1000
# The presets adapt the query and value projections, named for LLaMA; RoBERTa's are these.
ENCODER_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


@dataclass
class StudyConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    noises: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.4])
    seeds: int = 10
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    learning_rates: list[float] = field(default_factory=list)
    tuning_seeds: int = 2
    tuning_noise: float = 0.25
    n_train: int = 128
    n_val: int = 64
    n_test: int = 200
    negation: float = 0.0
    base_rank: int = 8
    alpha: float = 16.0
    max_steps: int = 80
    retrain_share: float = 1.5
    micro_batch_size: int = 16
    eval_steps: int = 10
    ds_config: str = "ds_configs/cpu_zero2.json"
    zero_stage: int = 0
    workers: int = 2
    time_budget_min: float = 0.0

    def run_key(self) -> dict:
        """The settings every run depends on (not which runs, nor how they are scheduled)."""
        skip = {"tasks", "noises", "seeds", "configs", "learning_rates", "tuning_seeds", "tuning_noise", "workers",
                "time_budget_min"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


STUDY_HELP = {  # python -m bench generalisation --help
    "tasks": f"tasks, from {list(TASKS)}",
    "noises": "shares of flipped training (and validation) labels, one study cell each",
    "seeds": "seeds per cell (each draws its own examples, flipped labels and adapter init)",
    "configs": f"method configurations, from {list(CONFIGS)}",
    "learning_rates": "one learning-rate grid for every configuration instead of GRIDS (a preset's other rates "
                      "keep their ratio to it)",
    "tuning_seeds": "seeds (1000, 1001, ...) of the learning-rate choice, apart from the evaluation seeds",
    "tuning_noise": "label noise of the learning-rate choice",
    "n_train": "training examples (the bi-level methods' D1 + D2)",
    "n_val": "validation examples held out of the same noisy file (early stopping, learning-rate choice)",
    "n_test": "clean test examples",
    "negation": 'share of task examples negated ("not" flips the label)',
    "base_rank": "rank at the project defaults; the other methods' ranks match LoRA's parameter count",
    "alpha": "adapter alpha at the project defaults",
    "max_steps": "inner training steps per run",
    "retrain_share": "bidora_paper's retraining steps per search step (the released scripts: 30000 / 20000)",
    "micro_batch_size": "examples per step",
    "eval_steps": "evaluate validation and test every N steps",
    "ds_config": "DeepSpeed config of every run (its ZeRO stage replaced by --zero_stage)",
    "zero_stage": "ZeRO stage of the runs (one rank: 0 is the same arithmetic as 2 without its bookkeeping, "
                  "tests/test_invariance.py)",
    "workers": "processes running fine-tunes side by side (one thread each)",
    "time_budget_min": "stop starting runs after this many minutes (0: no limit); the report uses whole seeds",
}


# ---- equal budgets ---------------------------------------------------------------------------

def parameter_counts(model_dir: str | Path, method: str, rank: int, targets: str,
                     encoder: bool = False) -> dict[str, int]:
    """{"inner", "outer", "trained", "inference"}: adapter parameters of ``method`` at ``rank`` on the
    model in ``model_dir`` (built on the meta device), counted from the layers' declared levels.
    Inference = what the merged model uses: everything, except Bi-LoRA's auxiliary (outer) module.
    An encoder's classification head (trained whole by every method) is not counted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ds_bilevel.adapters import AdapterConfig, inject_adapters
    from ds_bilevel.heads import head_names
    from ds_bilevel.levels import Level, named_level_parameters

    auto = AutoModelForSequenceClassification if encoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(AutoConfig.from_pretrained(model_dir, **({"num_labels": 2} if encoder else {})))
    config = AdapterConfig(method=method, rank=rank, aux_rank=rank, target_modules=targets.split(","))
    inject_adapters(model, config, exclude=head_names(model) if encoder else ())
    inner, outer = (sum(p.numel() for _, p in named_level_parameters(model, level))
                    for level in (Level.INNER, Level.OUTER))
    inference = inner if method == "bilora_sam" else inner + outer
    return {"inner": inner, "outer": outer, "trained": inner + outer, "inference": inference}


def matched_ranks(model_dir, study: StudyConfig, encoder: bool = False) -> dict[str, dict]:
    """Per configuration at the project defaults, the rank whose inference-time parameter count is
    closest to LoRA's at base_rank (a preset keeps its own rank and targets: counted, not matched)."""
    budget = parameter_counts(model_dir, "lora", study.base_rank, "all-linear", encoder)["inference"]
    chosen = {}
    for name in study.configs:
        method, preset = CONFIGS[name]
        if preset is not None:
            rank, targets = preset_adapter(preset, encoder)
            chosen[name] = {"rank": rank, "targets": targets, "budget": budget,
                            **parameter_counts(model_dir, method, rank, targets, encoder)}
            continue
        options = [(r, parameter_counts(model_dir, method, r, "all-linear", encoder))
                   for r in range(max(1, study.base_rank - 2), study.base_rank + 3)]
        rank, counts = min(options, key=lambda o: (abs(o[1]["inference"] - budget), o[0]))
        chosen[name] = {"rank": rank, "targets": "all-linear", **counts, "budget": budget}
    return chosen


def preset_values(preset: str) -> dict:
    """The preset's settings, flat ({"adapter.rank": 4, "bilevel.retrain_steps": 30000, ...})."""
    from ds_bilevel.config import read_preset

    return read_preset(preset)


def preset_adapter(preset: str, encoder: bool) -> tuple[int, str]:
    values = preset_values(preset)
    targets = values.get("adapter.target_modules", ["all-linear"])
    targets = targets.split(",") if isinstance(targets, str) else targets
    return values.get("adapter.rank", 8), ",".join(ENCODER_NAMES.get(t, t) if encoder else t for t in targets)


# ---- one run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    task: str
    noise: float
    config: str
    learning_rate: float
    seed: int


def write_task_files(folder: Path, study: StudyConfig, world: WorldConfig, noise: float,
                     seed: int) -> tuple[Path, Path]:
    """(training file, test file) of one seed and noise level: n_train + n_val noisy examples (the
    recipe holds out n_val as validation), and the clean test set."""
    lex = make_lexicon(world)
    train, test = make_task(lex, study.n_train + study.n_val, study.n_test, noise, seed, study.negation)
    paths = folder / f"task-noise{noise:g}-seed{seed}.jsonl", folder / f"test-seed{seed}.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):  # rewritten: the settings may have changed
        path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    return paths


def train_argv(study: StudyConfig, cell: Cell, model_dir: Path, data_file: Path, labels, budget: dict,
               out: Path, ds_config: Path) -> list[str]:
    """launch/train.py's flags for one run."""
    method, preset = CONFIGS[cell.config]
    argv = ["--ds_config", str(ds_config), "--model_name_or_path", str(model_dir), "--dataset", str(data_file),
            "--data.format", "classification", "--data.label_names", ",".join(labels),
            "--data.eval_size", str(study.n_val), "--method", method, "--seed", str(cell.seed),
            "--max_steps", str(study.max_steps), "--micro_batch_size", str(study.micro_batch_size),
            "--gradient_accumulation_steps", "1", "--eval_steps", str(study.eval_steps),
            "--log_steps", str(study.eval_steps), "--save_steps", "0",
            "--gradient_checkpointing", "false",  # a 1M-parameter model: memory is no concern, time is
            "--output_dir", str(out), "--overwrite_output_dir", "true"]
    if preset is None:
        return argv + ["--learning_rate", str(cell.learning_rate), "--adapter.rank", str(budget["rank"]),
                       "--adapter.aux_rank", str(budget["rank"]), "--adapter.alpha", str(study.alpha),
                       "--adapter.target_modules", "all-linear"]
    values = preset_values(preset)
    scale = cell.learning_rate / values["learning_rate"]  # the grid moves every rate of the preset alike
    argv += ["--preset", preset, "--learning_rate", str(cell.learning_rate),
             "--adapter.target_modules", budget["targets"]]
    for key in ("bilevel.outer_learning_rate", "bilevel.retrain_learning_rate"):
        if values.get(key):
            argv += [f"--{key}", f"{values[key] * scale:.6g}"]
    if values.get("bilevel.retrain_steps"):
        argv += ["--bilevel.retrain_steps", str(round(study.retrain_share * study.max_steps))]
    return argv


def run_id(study: StudyConfig, world: WorldConfig, cell: Cell, base: Path) -> str:
    """The run's cache name: its settings, its cell and its base (the pre-training's record, less its
    duration: the same seeded pre-training on another machine names the same runs)."""
    record = json.loads((base / "pretraining.json").read_text())
    record.pop("seconds", None)
    base_record = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    key = json.dumps([study.run_key(), world.key(), asdict(cell), base_record], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---- the study -------------------------------------------------------------------------------

def grid(study: StudyConfig, config: str) -> list[float]:
    return [float(lr) for lr in (study.learning_rates or GRIDS[config])]


def tuning_cells(study: StudyConfig) -> list[Cell]:
    return [Cell(task, float(study.tuning_noise), config, lr, TUNING_SEED0 + seed)
            for seed in range(study.tuning_seeds) for task in study.tasks for config in study.configs
            for lr in grid(study, config)]


def evaluation_cells(study: StudyConfig, chosen: dict[tuple[str, str], float]) -> list[Cell]:
    """Seed by seed: a study stopped by its time budget has whole seeds (the report uses only those)."""
    return [Cell(task, float(noise), config, chosen[task, config], seed) for seed in range(study.seeds)
            for task in study.tasks for noise in study.noises for config in study.configs
            if (task, config) in chosen]


class Study:
    """The runs of one study: their jobs, the cache that holds their results, the workers that run them."""

    def __init__(self, study: StudyConfig, world: WorldConfig, log=print):
        self.study, self.world, self.log = study, world, log
        self.cache = CACHE_ROOT / "generalisation-v2"
        (self.cache / "runs").mkdir(parents=True, exist_ok=True)
        self.bases = {"decoder": pretrained_model(world, log) if "decoder" in study.tasks else None,
                      "encoder": pretrained_encoder(world, log) if "encoder" in study.tasks else None}
        self.lex = make_lexicon(world)
        self.budgets = {task: matched_ranks(self.bases[task], study, encoder=task == "encoder")
                        for task in study.tasks}
        self.ds_config = self.cache / f"ds_config_zero{study.zero_stage}.json"
        ds_config = json.loads((ROOT / study.ds_config).read_text())
        ds_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "stage": study.zero_stage}
        self.ds_config.write_text(json.dumps(ds_config, indent=2))
        self.deadline = time.time() + study.time_budget_min * 60 if study.time_budget_min else None
        self.seed_cache_from(RESULTS / "generalisation.json")

    def seed_cache_from(self, report: Path) -> None:
        """The runs of a committed report are cached runs: a study resumes on another machine (the run
        cache under ~/.cache is local) where it stopped, and a report regenerates without re-running."""
        if not report.is_file():
            return
        cell_keys = {f.name for f in fields(Cell)} | {"stage", "run_id"}
        for run in json.loads(report.read_text()).get("runs", []):
            path = self.cache / "runs" / f"{run.get('run_id')}.json"
            if "run_id" in run and not path.is_file():
                path.write_text(json.dumps({k: v for k, v in run.items() if k not in cell_keys}))

    def run(self, cells: list[Cell], stage: str) -> list[dict]:
        """Every cell's result (running those not cached); a cell the time budget left out has none."""
        jobs = {}
        for cell in cells:
            data_file, test_file = write_task_files(self.cache, self.study, self.world, cell.noise, cell.seed)
            rid = run_id(self.study, self.world, cell, self.bases[cell.task])
            argv = train_argv(self.study, cell, self.bases[cell.task], data_file, self.lex.labels,
                              self.budgets[cell.task][cell.config], self.cache / "out" / rid, self.ds_config)
            jobs[cell] = {"argv": argv, "test_file": str(test_file), "result": str(self.cache / "runs" / f"{rid}.json")}
        todo = [job for job in jobs.values() if not Path(job["result"]).is_file()]
        self.log(f"{stage}: {len(jobs)} runs, {len(jobs) - len(todo)} cached, {len(todo)} to run on "
                 f"{self.study.workers} workers")
        if todo:
            run_workers(todo, self.study.workers, self.deadline, self.cache, self.log)
        return [{**asdict(cell), "stage": stage, "run_id": Path(job["result"]).stem,
                 **json.loads(Path(job["result"]).read_text())} for cell, job in jobs.items()
                if Path(job["result"]).is_file()]


def run_study(study: StudyConfig, world: WorldConfig, log=print) -> dict:
    from bench.generalisation_report import choose_learning_rates

    start = time.perf_counter()
    runs = Study(study, world, log)
    tuning = runs.run(tuning_cells(study), "tuning")
    chosen = choose_learning_rates(tuning, study.max_steps)
    log("learning rates: " + ", ".join(f"{task} {config} {lr:g}" for (task, config), lr in chosen.items()))
    evaluation = runs.run(evaluation_cells(study, chosen), "evaluation")
    pretraining = {task: json.loads((runs.bases[task] / "pretraining.json").read_text()) for task in study.tasks}
    return {"study": asdict(study), "world": asdict(world), "lexicon": asdict(runs.lex), "pretraining": pretraining,
            "budgets": runs.budgets, "grids": {config: grid(study, config) for config in study.configs},
            "chosen": [{"task": t, "config": c, "learning_rate": lr} for (t, c), lr in chosen.items()],
            "runs": tuning + evaluation, "wall_s": time.perf_counter() - start}


def run_workers(todo: list[dict], workers: int, deadline: float | None, cache: Path, log) -> None:
    """Worker processes side by side, the jobs dealt round-robin; each stops starting jobs at the deadline."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)  # each worker is a one-rank world of its own (its own free port)
    procs = []
    for w in range(workers):
        plan = cache / f"worker{w}-{os.getpid()}.json"  # two studies at once do not share plans
        plan.write_text(json.dumps({"deadline": deadline, "jobs": todo[w::workers]}))
        log_file = plan.with_suffix(".log").open("w")
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "bench" / "generalisation_worker.py"), str(plan)],
                                       cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_file))
    started, total = time.perf_counter(), len(todo)
    while any(p.poll() is None for p, _ in procs):
        time.sleep(30)
        done = sum(Path(job["result"]).is_file() for job in todo)
        log(f"[{(time.perf_counter() - started) / 60:5.1f} min] {done}/{total} runs")
    for p, log_file in procs:
        log_file.close()
        if p.returncode != 0:
            log(f"a worker exited with {p.returncode}: see {log_file.name}")


def main(argv: list[str] | None = None) -> int:
    from bench.generalisation_report import write_report

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(prog="python -m bench generalisation", description=__doc__.split("\n\n")[0],
                                     formatter_class=Formatter)
    defaults = StudyConfig()
    for f in fields(StudyConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, list):
            kind = float if f.name in ("noises", "learning_rates") else str
            parser.add_argument(f"--{f.name}", nargs="+", type=kind, default=value, help=STUDY_HELP[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=type(value), default=value, help=STUDY_HELP[f.name])
    parser.add_argument("--out", default=str(RESULTS), help="folder for generalisation.{json,md,png}")
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    study = StudyConfig(**args)
    for name, allowed in (("tasks", TASKS), ("configs", CONFIGS)):
        unknown = set(getattr(study, name)) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    results = run_study(study, WorldConfig(), log=lambda m: print(m, flush=True))
    paths = write_report(results, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
