"""Generalisation study (issue #7): LoRA, DoRA, BiLoRA, BiDoRA and Bi-LoRA on a small noisy task.

    python -m bench.generalisation                 # the full study (resumes from its run cache)
    python -m bench.generalisation --seeds 1 --max_steps 20   # a smoke run

A LLaMA-architecture model is pre-trained on a synthetic corpus (bench/generalisation_task.py,
cached), then fine-tuned with every method through launch/train.py (DeepSpeed, 1 CPU rank) on
the same few noisy examples: the baselines (lora, dora, bilora_sam) on all of them, the bi-level
methods (bilora, bidora) on D1 + D2 = the same examples. The shared learning rate is picked first
by a sweep (--sweep_lrs) of LoRA on seed 0: the rate with the best clean test accuracy there
(ties: the smaller), a choice that favours the LoRA baseline if anything. The clean test set is the training
file's held-out share (placed so that the recipe holds out exactly it); after training, each
run is exported merged (fp32) and scored here on the training and the test examples.
Outputs: bench/results/generalisation.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from bench.generalisation_task import CACHE_ROOT, WorldConfig, make_lexicon, make_task, pretrained_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METHODS = ("lora", "dora", "bilora", "bidora", "bilora_sam")
NAMES = {"lora": "LoRA", "dora": "DoRA", "bilora": "BiLoRA", "bidora": "BiDoRA", "bilora_sam": "Bi-LoRA"}
BILEVEL = ("bilora", "bidora")  # trained on D1 / D2 splits of the same training set


@dataclass
class StudyConfig:
    n_train: int = 128
    noise: float = 0.25
    n_test: int = 300
    negation: float = 0.0  # share of task examples negated ("not" flips the label); see the report
    seeds: int = 5
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    base_rank: int = 8  # LoRA's rank; the others' ranks are chosen to match its parameter count
    alpha: float = 16.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    learning_rate: float = 3e-3  # used as is when sweep_lrs is empty; else the sweep's pick
    sweep_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    max_steps: int = 250
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    eval_steps: int = 30
    hypergrad: str = "darts"
    split_ratio: float = 0.8
    ds_config: str = "ds_configs/cpu_zero2.json"
    master_port: int = 29731

    def key(self, world: WorldConfig) -> str:
        settings = {k: v for k, v in asdict(self).items() if k not in ("seeds", "methods", "master_port", "sweep_lrs")}
        return hashlib.sha256(json.dumps([settings, world.key()], sort_keys=True).encode()).hexdigest()[:12]


# ---- equal budgets and equal data -------------------------------------------------------------

def parameter_counts(model_dir: str | Path, method: str, rank: int, targets: str) -> dict[str, int]:
    """{"inner", "outer", "trained", "inference"}: adapter parameters of ``method`` at ``rank`` on the
    model in ``model_dir`` (built on the meta device), counted from the layers' declared levels.
    Inference = what the merged model uses: everything, except Bi-LoRA's auxiliary (outer) module."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_bilevel.adapters import AdapterConfig, inject_adapters
    from ds_bilevel.levels import Level, named_level_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    inject_adapters(model, AdapterConfig(method=method, rank=rank, aux_rank=rank, target_modules=targets.split(",")))
    inner, outer = (sum(p.numel() for _, p in named_level_parameters(model, level))
                    for level in (Level.INNER, Level.OUTER))
    inference = inner if method == "bilora_sam" else inner + outer
    return {"inner": inner, "outer": outer, "trained": inner + outer, "inference": inference}


def matched_ranks(model_dir, study: StudyConfig) -> dict[str, dict]:
    """Per method, the rank whose inference-time parameter count is closest to LoRA's at base_rank."""
    budget = parameter_counts(model_dir, "lora", study.base_rank, study.target_modules)["inference"]
    chosen = {}
    for method in study.methods:
        options = [(r, parameter_counts(model_dir, method, r, study.target_modules))
                   for r in range(max(1, study.base_rank - 2), study.base_rank + 3)]
        rank, counts = min(options, key=lambda o: (abs(o[1]["inference"] - budget), o[0]))
        chosen[method] = {"rank": rank, **counts, "budget": budget}
    return chosen


def heldout_positions(n_train: int, n_test: int, seed: int) -> list[int]:
    """The file rows that ``datasets``' train_test_split(test_size=n_test, seed=seed) holds out."""
    from datasets import Dataset

    rows = Dataset.from_dict({"row": list(range(n_train + n_test))})
    return sorted(rows.train_test_split(test_size=n_test, seed=seed)["test"]["row"])


def write_task_file(path: Path, train: list[dict], test: list[dict], seed: int, data_config) -> None:
    """One JSONL whose held-out share (the recipe's evaluation set) is exactly the clean test set;
    checked with the recipe's own ``load_records``."""
    from ds_bilevel.data import load_records

    held = set(heldout_positions(len(train), len(test), seed))
    train_it, test_it = iter(train), iter(test)
    rows = [next(test_it) if i in held else next(train_it) for i in range(len(train) + len(test))]
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    got_train, got_eval = load_records(str(path), data_config, seed)

    def pairs(examples):
        return sorted((e["text"], data_config.label_names[e["label"]]) for e in examples)

    if sorted(zip(got_eval["prompt"], got_eval["response"], strict=True)) != pairs(test) or \
            sorted(zip(got_train["prompt"], got_train["response"], strict=True)) != pairs(train):
        raise RuntimeError(f"{path}: the recipe's train/eval split is not the intended train/test split")


def bilevel_split_sizes(n_train: int, split_ratio: float, seed: int) -> tuple[int, int]:
    from ds_bilevel.schedule import split_d1_d2

    d1, d2 = split_d1_d2(n_train, split_ratio, seed)
    return len(d1), len(d2)


# ---- one run ---------------------------------------------------------------------------------

@dataclass
class Job:
    method: str
    seed: int
    rank: int
    model_dir: Path
    data_file: Path
    labels: tuple[str, str]
    out: Path


def train_args(study: StudyConfig, job: Job) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
            str(study.master_port), "launch/train.py", "--ds_config", study.ds_config,
            "--model_name_or_path", str(job.model_dir), "--dataset", str(job.data_file),
            "--data.format", "classification", "--data.label_names", ",".join(job.labels),
            "--data.eval_size", str(study.n_test), "--method", job.method, "--seed", str(job.seed),
            "--adapter.rank", str(job.rank), "--adapter.aux_rank", str(job.rank), "--adapter.alpha", str(study.alpha),
            "--adapter.target_modules", study.target_modules, "--learning_rate", str(study.learning_rate),
            "--max_steps", str(study.max_steps), "--micro_batch_size", str(study.micro_batch_size),
            "--gradient_accumulation_steps", str(study.gradient_accumulation_steps),
            "--eval_steps", str(study.eval_steps), "--log_steps", str(study.eval_steps),
            "--hypergrad", study.hypergrad, "--split_ratio", str(study.split_ratio),
            "--gradient_checkpointing", "false",  # a 1M-parameter model: memory is no concern, time is
            "--output_dir", str(job.out), "--overwrite_output_dir", "true"]


def run_job(study: StudyConfig, job: Job, log) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(train_args(study, job), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (job.out.parent / f"{job.out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (job.out / "summary.json").is_file():
        for shm in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{study.master_port}_*"):  # only ours
            shm.unlink(missing_ok=True)
        tail = (proc.stdout + proc.stderr)[-1500:]
        log(f"{job.method} seed {job.seed} failed (exit {proc.returncode}):\n{tail}")
        return {"method": job.method, "seed": job.seed, "failed": True, "exit_code": proc.returncode, "tail": tail}
    summary = json.loads((job.out / "summary.json").read_text())
    curve = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]
    return {"method": job.method, "seed": job.seed, "rank": job.rank, "launch_wall_s": wall,
            "train_time_s": summary["train_time_s"], "recipe_test_exact_match": summary["exact_match_after"],
            "relative_change": summary.get("relative_change"),
            "test_curve": [(r["step"], r["eval_exact_match"]) for r in curve if "eval_exact_match" in r]}


def score(job: Job, train: list[dict], test: list[dict], data_config) -> dict:
    """Export the run merged in fp32, load it with plain transformers, and measure teacher-forced
    exact match (as the recipe does) on the noisy training labels, the clean ones, and the test set."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_bilevel.data import collate, tokenize
    from ds_bilevel.export import export

    merged = export(job.out, job.out.parent / f"{job.out.name}-merged", format="merged", dtype="float32",
                    overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)

    label_ids = torch.tensor([tokenizer(w, add_special_tokens=False).input_ids[0] for w in job.labels])
    predicted: list[int] = []  # test set: the likelier of the two label words at the label position

    def right(examples: list[dict], label_key: str) -> list[bool]:
        records = Dataset.from_list([{"prompt": e["text"], "response": job.labels[e[label_key]]} for e in examples])
        encoded, out = tokenize(records, tokenizer, data_config), []
        predicted.clear()
        for i in range(0, len(encoded), 64):
            batch = collate([encoded[j] for j in range(i, min(i + 64, len(encoded)))], tokenizer.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]
            out += ((logits[:, :-1].argmax(-1) == target) | (target == -100)).all(1).tolist()
            first = (target != -100).int().argmax(1)  # where the label word is predicted
            pair = logits[:, :-1][torch.arange(len(first)), first][:, label_ids]
            predicted.extend((pair[:, 1] > pair[:, 0]).int().tolist())
        return out

    fit, clean, on_test = right(train, "label"), right(train, "clean_label"), right(test, "label")
    noisy = [i for i, e in enumerate(train) if e["noisy"]]
    shutil.rmtree(merged)
    return {"train_acc": sum(fit) / len(fit), "train_clean_acc": sum(clean) / len(clean),
            "test_acc": sum(on_test) / len(on_test), "gap": sum(fit) / len(fit) - sum(on_test) / len(on_test),
            "noise_memorised": sum(fit[i] for i in noisy) / max(len(noisy), 1),
            "test_predicted_positive": sum(predicted) / len(predicted),
            "test_choice_acc": sum(p == e["label"] for p, e in zip(predicted, test, strict=True)) / len(test)}


# ---- the study -------------------------------------------------------------------------------

def pick_learning_rate(sweep: list[dict], default: float) -> float:
    """The swept rate with the best LoRA seed-0 clean test accuracy (ties: the smaller rate)."""
    done = [r for r in sweep if not r.get("failed")]
    return min(done, key=lambda r: (-r["test_acc"], r["learning_rate"]))["learning_rate"] if done else default


def run_study(study: StudyConfig, world: WorldConfig, log=print) -> dict:
    from ds_bilevel.data import DataConfig

    start = time.perf_counter()
    model_dir = pretrained_model(world, log)
    lex = make_lexicon(world)
    data_config = DataConfig(format="classification", label_names=list(lex.labels), eval_size=study.n_test)
    budgets = matched_ranks(model_dir, study)
    log("ranks and adapter parameters: " + ", ".join(f"{m} r={b['rank']} {b['inference']}" for m, b in budgets.items()))
    context = (lex, data_config, model_dir, budgets, start, log)
    sweep = []
    for lr in study.sweep_lrs:
        swept = replace(study, learning_rate=float(lr))
        sweep += [{**r, "learning_rate": float(lr)} for r in run_seeds(swept, world, ["lora"], [0], context)]
    if study.sweep_lrs:
        study = replace(study, learning_rate=pick_learning_rate(sweep, study.learning_rate))
        log("learning-rate sweep (LoRA, seed 0): " + ", ".join(
            f"{r['learning_rate']:g}: test {r.get('test_acc', -1):.3f} train {r.get('train_acc', -1):.3f}"
            for r in sweep) + f" -> {study.learning_rate:g}")
    runs = run_seeds(study, world, study.methods, range(study.seeds), context)
    d1, d2 = bilevel_split_sizes(study.n_train, study.split_ratio, 0)
    pretraining = json.loads((model_dir / "pretraining.json").read_text())
    return {"study": asdict(study), "world": asdict(world), "lexicon": asdict(lex), "pretraining": pretraining,
            "model_dir": str(model_dir), "budgets": budgets, "split_sizes": {"d1": d1, "d2": d2},
            "sweep": sweep, "runs": runs, "wall_s": time.perf_counter() - start}


def run_seeds(study: StudyConfig, world: WorldConfig, methods, seeds, context) -> list[dict]:
    """Every method on every seed (cached per settings hash, method and seed)."""
    lex, data_config, model_dir, budgets, start, log = context
    cache = CACHE_ROOT / f"generalisation-{study.key(world)}"
    cache.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        train, test = make_task(lex, study.n_train, study.n_test, study.noise, seed, study.negation)
        data_file = cache / f"task-seed{seed}.jsonl"
        write_task_file(data_file, train, test, seed, data_config)
        for method in methods:
            result_file = cache / f"{method}-seed{seed}.json"
            if result_file.is_file():
                runs.append(json.loads(result_file.read_text()))
                continue
            job = Job(method, seed, budgets[method]["rank"], model_dir, data_file, lex.labels,
                      cache / f"run-{method}-seed{seed}")
            log(f"[{time.perf_counter() - start:6.0f} s] {method} seed {seed} ...")
            result = run_job(study, job, log)
            if not result.get("failed"):
                result.update(score(job, train, test, data_config))
                log(f"    test {result['test_acc']:.3f} train {result['train_acc']:.3f} "
                    f"predicted positive {result['test_predicted_positive']:.2f} "
                    f"(recipe's bf16 test {result['recipe_test_exact_match']:.3f}, {result['launch_wall_s']:.0f} s)")
            result_file.write_text(json.dumps(result))
            runs.append(result)
    return runs


STUDY_HELP = {  # python -m bench generalisation --help
    "n_train": "training examples of the noisy task",
    "noise": "share of training labels flipped",
    "n_test": "clean test examples",
    "negation": 'share of task examples negated ("not" flips the label)',
    "seeds": "seeds per method (each draws its own examples and flipped labels)",
    "methods": f"methods compared, from {list(METHODS)}",
    "base_rank": "LoRA's rank; the other methods' ranks match its parameter count",
    "alpha": "adapter alpha of every method",
    "target_modules": "comma-separated layers adapted",
    "learning_rate": "the learning rate when --sweep_lrs is empty (else the sweep picks one)",
    "sweep_lrs": "learning rates of the LoRA sweep on seed 0 that picks the shared rate (empty: no sweep)",
    "max_steps": "training steps per run",
    "micro_batch_size": "examples per rank per forward",
    "gradient_accumulation_steps": "micro batches per optimizer step",
    "eval_steps": "evaluate every N steps",
    "hypergrad": "hypergradient of the bi-level methods",
    "split_ratio": "share of the training data in D1 (bi-level methods)",
    "ds_config": "DeepSpeed config of every run",
    "master_port": "port of the runs' process groups",
}


def main(argv: list[str] | None = None) -> int:
    from bench.generalisation_report import write_report

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(prog="python -m bench generalisation", description=__doc__.split("\n\n")[0],
                                     formatter_class=Formatter)
    defaults = StudyConfig()
    for f in fields(StudyConfig):
        value = getattr(defaults, f.name)
        if f.name == "sweep_lrs":
            parser.add_argument("--sweep_lrs", nargs="*", type=float, default=value, help=STUDY_HELP[f.name])
        elif isinstance(value, list):
            parser.add_argument(f"--{f.name}", nargs="+", default=value, help=STUDY_HELP[f.name])
        else:
            parser.add_argument(f"--{f.name}", type=type(value), default=value, help=STUDY_HELP[f.name])
    parser.add_argument("--out", default=str(RESULTS), help="folder for generalisation.{json,md,png}")
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    study = StudyConfig(**args)
    unknown = set(study.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    results = run_study(study, WorldConfig(), log=lambda m: print(m, flush=True))
    paths = write_report(results, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
