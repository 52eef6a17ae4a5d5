"""Aten operations per optimizer step, ours against HF PEFT and per method, and where they come from.

    python -m bench step_ops [--model builtin:tiny-llama] [--configs "lora,bidora darts"] [--out bench/results]

On a GPU every aten operation is (at least) one kernel launch, and a small model's step is
bound by launches, not by arithmetic: the op count is the part of a step's cost that the CPU
can measure exactly, whatever the machine's load. One launch of the deepspeed launcher on one
rank runs every configuration in the same process (this file is the worker as well,
``--worker PLAN.json``): the set-up and one cycle untimed, then ``CYCLES`` optimizer cycles
(one inner step, or for a bi-level method ``--unroll`` T1 inner steps and the outer step;
T1 = 1 by default) under a
``TorchDispatchMode`` that counts every op that launches a kernel (not views, allocations or
profiler marks). The flags are those of ``bench peer``
and ``bench methods`` (bench.common.timed_args: ZeRO-2 fp32, activation checkpointing, micro
batch 8 x 2 accumulation, r = 8 on all seven projections); the PEFT peer is
bench/peft_worker.py's model and loop.

Each op is attributed to a zone: the first Python frame outside torch that issued it
(``ds_bilevel/adapters/fused.py:forward``, ``deepspeed/runtime/zero/stage_1_and_2.py:...``,
with a ``[recompute]`` mark when activation checkpointing re-runs a forward inside the
backward), or, for ops that autograd's built-in derivative formulas issue from C++,
``autograd: backward of <the zone of the forward call that made the node>`` (or
``autograd: torch::autograd::AccumulateGrad``, a gradient added to one that exists). Each
configuration is counted a second time with adapters on ``--scaling_targets`` only (default
q_proj,v_proj: 8 of tiny-llama's 28 layers): the difference per adapted layer says which
zones grow with the number of adapters (per-layer and per-parameter loops; on a GPU each is a
launch per adapter tensor) and which are the base model's fixed cost.

The counts are those of the CPU dispatch path. A GPU runs the same Python code, but some ops
differ there (fused attention kernels, CUDA-only foreach paths): read the counts as what each
zone asks for, and compare configurations, not machines.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the launcher

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.adapter_layer import VIEW_OPS as LAYER_VIEW_OPS  # noqa: E402
from bench.common import REPO, RESULTS, launch, machine, table, timed_args  # noqa: E402
from bench.gpu import PEER, UNDETACHED, siblings  # noqa: E402
from bench.passes import analytic_passes, method_args  # noqa: E402

CYCLES = 2
"""Optimizer cycles counted per configuration, after one untimed cycle (first-step allocations)."""
# name -> (kind, method, hypergrad, extra train.py flags)
CONFIGS = {
    "peft lora": ("peft", "lora", None, []), "peft dora": ("peft", "dora", None, []),
    "lora": ("ours", "lora", None, []), "dora": ("ours", "dora", None, []),
    UNDETACHED: ("ours", "dora", None, ["--adapter.detach_norm", "false"]),  # BiDoRA's pass (bench/gpu.py)
    "bilora_sam": ("ours", "bilora_sam", None, []),
    "bilora first_order": ("ours", "bilora", "first_order", []), "bilora darts": ("ours", "bilora", "darts", []),
    "bidora first_order": ("ours", "bidora", "first_order", []), "bidora darts": ("ours", "bidora", "darts", []),
}
# Ops that launch no kernel: views and allocations (bench/adapter_layer.py's, and those a whole step
# adds: unbind and chunk are views, the empty_* allocate without writing), and the profiler's range
# marks that record_function dispatches (torch's optimizer step opens one; NodeZones's calls doubled them).
NO_KERNEL_OPS = LAYER_VIEW_OPS | {"unbind", "chunk", "expand_as", "empty_like", "empty_strided", "new_empty_strided",
                                  "_record_function_enter", "_record_function_enter_new", "_record_function_exit"}
GROUPS = ("ours", "deepspeed", "transformers", "peft", "autograd backward", "torch checkpoint", "other")
TORCH_DIR = str(Path(torch.__file__).parent) + "/"
CHECKPOINT_FILE = TORCH_DIR + "utils/checkpoint.py"
ENGINE_RUN = (TORCH_DIR + "autograd/graph.py", "_engine_run_backward")
ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"


# ---- counting (in the worker) -------------------------------------------------------------

def short_name(filename: str) -> str:
    return filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")


def caller_zone(frame) -> tuple[str, bool]:
    """(zone, issued by autograd's C++ engine): the first frame outside torch above ``frame``, or
    torch's checkpoint module itself (its own ops: the saved RNG state, the recompute's bookkeeping)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if (name, frame.f_code.co_name) == ENGINE_RUN:
            return "", True  # no Python frame between the engine and the op: a built-in derivative
        if frame.f_code is OWN_MODE_CODE:
            pass  # NodeZones ran the call: the zone is its caller's
        elif not name.startswith(TORCH_DIR) or name == CHECKPOINT_FILE:
            return f"{short_name(name)}:{frame.f_code.co_name}", False
        frame = frame.f_back
    return "?", False


def in_recompute(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename == CHECKPOINT_FILE and "recompute" in frame.f_code.co_name:
            return True
        frame = frame.f_back
    return False


class NodeZones(TorchFunctionMode):
    """Labels each autograd node with the zone of the forward call that created it, so that the
    engine's built-in derivatives can be charged to the code whose forward they differentiate."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        zone = None
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            # One call can make several nodes (F.linear on 3-d input: a matmul, then a view): walk
            # back from the output to the nodes labelled by earlier calls. Not AccumulateGrad: a
            # parameter's node outlives the step, and its ops are accumulation, not a derivative.
            stack = [tensor.grad_fn] if isinstance(tensor, torch.Tensor) else []
            while stack:
                node = stack.pop()
                if node is None or "zone" in node.metadata or node.name() == ACCUMULATE_GRAD:
                    continue
                zone = zone or caller_zone(sys._getframe(1))[0] or "?"
                node.metadata["zone"] = zone
                stack.extend(parent for parent, _ in node.next_functions)
        return out


OWN_MODE_CODE = NodeZones.__torch_function__.__code__


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel, by zone, aten name and ``self.step`` (the kind of step running)."""

    def __init__(self):
        super().__init__()
        self.step = ""
        self.zones, self.aten, self.steps = collections.Counter(), collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name not in NO_KERNEL_OPS:
            frame = sys._getframe(1)
            zone, by_engine = caller_zone(frame)
            if by_engine:
                node = torch._C._current_autograd_node()
                label = node.metadata.get("zone") if node is not None else None
                # unlabelled: a parameter's AccumulateGrad (adding to a .grad that exists already)
                zone = f"autograd: backward of {label}" if label else f"autograd: {node.name() if node else '?'}"
            elif torch._C._current_autograd_node() is not None and in_recompute(frame):
                zone += " [recompute]"
            self.zones[zone] += 1
            self.aten[name] += 1
            self.steps[self.step] += 1
        return out


def count_cycles(cycles: list[list[tuple[str, object]]], take) -> dict:
    """Run cycles[0] uncounted, count the others; ``take(kind, batch)`` runs one step."""
    for kind, batch in cycles[0]:
        take(kind, batch)
    per_cycle = []
    with NodeZones(), OpCounter() as counter:
        for cycle in cycles[1:]:
            before = sum(counter.steps.values())
            for kind, batch in cycle:
                counter.step = kind
                take(kind, batch)
            per_cycle.append(sum(counter.steps.values()) - before)
    n = len(cycles) - 1
    return {"cycle_ops": per_cycle, "by_step": {k: v / n for k, v in counter.steps.items()},
            "zones": {z: v / n for z, v in counter.zones.most_common()},
            "aten": {a: v / n for a, v in counter.aten.most_common(40)}}


def count_ours(argv: list[str]) -> dict:
    from ds_bilevel.config import load_config
    from ds_bilevel.ds_config import fill_ds_config, read_ds_config
    from ds_bilevel.levels import StepKind, TrainingMode
    from ds_bilevel.recipe import TrainingRecipe
    from ds_bilevel.schedule import events

    run = load_config(argv)
    recipe = TrainingRecipe(run, fill_ds_config(read_ds_config(run.ds_config), run, int(os.environ["WORLD_SIZE"])))
    recipe.setup()
    bilevel = recipe.engine.mode == TrainingMode.BILEVEL
    unroll = run.bilevel.unroll_steps if bilevel else 1
    cycles = []  # one-level: a cycle per step; bi-level: T1 inner steps and the outer steps after them
    for kind, index in events(recipe.engine.mode, (1 + CYCLES) * unroll, unroll, run.bilevel.outer_steps):
        if not cycles or not bilevel or cycles[-1][-1][0] == StepKind.OUTER.value:
            cycles.append([])
        cycles[-1].append((kind.value, recipe.sources[kind].batch(index)))  # built before counting: host work
    result = count_cycles(cycles, lambda kind, batch: recipe.engine.step(StepKind(kind), batch))
    recipe.cleanup()
    return {**result, "inner_steps_per_cycle": unroll, "adapted_layers": recipe.adapted_layers["count"]}


def count_peft(argv: list[str], method: str) -> dict:
    """bench/peft_worker.py's set-up and loop (its model, optimizer, schedule and idiom)."""
    from peft.tuners.lora import LoraLayer

    from bench.peft_worker import peft_training
    from ds_bilevel.config import load_config

    run = load_config(argv)
    engine, source = peft_training(run, method, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))

    def step(kind, batch):
        for micro in batch.micro_batches:
            loss = engine(**{key: value.to(engine.device) for key, value in micro.items()}).loss
            engine.backward(loss)
            engine.step()

    result = count_cycles([[("inner", source.batch(i))] for i in range(1 + CYCLES)], step)
    adapted = sum(isinstance(m, LoraLayer) for m in engine.module.modules())
    engine.destroy()
    return {**result, "inner_steps_per_cycle": 1, "adapted_layers": adapted}


def worker(plan_path: Path) -> None:
    import deepspeed

    from bench.gpu_worker import reset_between_configs

    deepspeed.init_distributed()
    plan = json.loads(plan_path.read_text())
    results = []
    for entry in plan["entries"]:
        reset_between_configs()
        started = time.perf_counter()
        counted = count_peft(entry["argv"], entry["method"]) if entry["kind"] == "peft" else count_ours(entry["argv"])
        results.append({**entry, **counted, "wall_s": time.perf_counter() - started})
        print(f"counted {entry['name']} ({entry['targets']}, repeat {entry['repeat']}): "
              f"{counted['cycle_ops']} ops per cycle", flush=True)
    if os.environ.get("RANK", "0") == "0":
        Path(plan["out"]).write_text(json.dumps(results))


# ---- the benchmark (launches the worker, derives, reports) ----------------------------------

def zone_group(zone: str) -> str:
    if zone.startswith("autograd:"):
        return "autograd backward"
    for prefix, group in (("ds_bilevel/", "ours"), ("deepspeed/", "deepspeed"), ("transformers/", "transformers"),
                          ("peft/", "peft"), ("torch/utils/checkpoint", "torch checkpoint")):
        if zone.startswith(prefix):
            return group
    return "other"


def plan_entries(options, folder: Path) -> list[dict]:
    targets = {"all": []}
    if options.scaling_targets:
        targets["subset"] = ["--adapter.target_modules", options.scaling_targets]
    entries = []
    for repeat in range(options.repeats):
        for name in options.configs.split(","):
            kind, method, hypergrad, extra = CONFIGS[name]
            for label, flags in targets.items():
                if label == "subset" and repeat:
                    continue  # the scaling count needs one repeat
                output = folder / f"{name.replace(' ', '_')}_{label}_{repeat}"
                steps = max(10, (1 + CYCLES) * options.unroll)
                argv = [*timed_args(options.model, steps, options.ds_config), *flags,
                        "--output_dir", str(output), "--overwrite_output_dir", "true"]
                if kind == "ours":
                    argv += [*method_args(method, hypergrad, options.unroll), *extra]
                entries.append({"name": name, "kind": kind, "method": method, "targets": label, "repeat": repeat,
                                "argv": argv})
    return entries


def mean_cycle(count: dict) -> float:
    return sum(count["cycle_ops"]) / len(count["cycle_ops"])


def derive(counted: list[dict], unroll: int = 1) -> list[dict]:
    """One row per configuration: its counts (first repeat), the ratios, the zones and their
    growth per adapted layer (from the scaling count)."""
    first = {c["name"]: c for c in counted if c["targets"] == "all" and c["repeat"] == 0}
    subset = {c["name"]: c for c in counted if c["targets"] == "subset"}
    per_inner = {name: mean_cycle(c) / c["inner_steps_per_cycle"] for name, c in first.items()}
    rows = []
    for name, count in first.items():
        kind, method, hypergrad, _ = CONFIGS[name]
        passes, ops = analytic_passes(method, hypergrad, unroll), per_inner[name]
        repeats = [c["cycle_ops"] for c in counted if c["name"] == name and c["targets"] == "all"]
        groups = collections.Counter()
        for zone, n in count["zones"].items():
            groups[zone_group(zone)] += n
        row = {"config": name, "passes_per_inner_step": passes, "ops_per_cycle": mean_cycle(count),
               "cycle_ops": count["cycle_ops"], "ops_by_step": count["by_step"], "ops_per_inner_step": ops,
               "repeats_cycle_ops": repeats, "deterministic": all(r == repeats[0] for r in repeats),
               "adapted_layers": count["adapted_layers"], "groups": dict(groups), "zones": count["zones"],
               "aten": count["aten"], "vs_passes_x_sibling": {}}
        if kind == "ours":
            if "lora" in per_inner:
                row["vs_lora"] = ops / per_inner["lora"]
            if PEER.get(name) in per_inner:
                row["vs_peft"] = ops / per_inner[PEER[name]]
            row["vs_passes_x_sibling"] = {s: ops / (passes * per_inner[s]) for s in siblings(method) if s in per_inner}
        small = subset.get(name)
        if small and small["adapted_layers"] != count["adapted_layers"]:
            layers = count["adapted_layers"] - small["adapted_layers"]
            row["ops_per_adapted_layer"] = (mean_cycle(count) - mean_cycle(small)) / layers
            row["zone_ops_per_adapted_layer"] = {
                zone: (count["zones"].get(zone, 0.0) - small["zones"].get(zone, 0.0)) / layers
                for zone in {**count["zones"], **small["zones"]}}
        rows.append(row)
    return rows


def markdown(rows: list[dict], top: int = 6) -> str:
    def fmt(value, spec=".2f"):
        return "" if value is None else format(value, spec)

    counts = table(
        ["config", "passes/inner step", "ops/cycle (inner + outer)", "ops/inner step", "vs LoRA",
         "/ (passes x sibling)", "vs PEFT", "ops per adapted layer"],
        [[r["config"], f"{r['passes_per_inner_step']:g}",
          f"{r['ops_per_cycle']:.0f}" + (" (" + " + ".join(f"{v:.0f}" for v in r["ops_by_step"].values()) + ")"
                                          if len(r["ops_by_step"]) > 1 else ""),
          f"{r['ops_per_inner_step']:.0f}", fmt(r.get("vs_lora")),
          ", ".join(f"{v:.2f} ({s})" for s, v in r["vs_passes_x_sibling"].items()), fmt(r.get("vs_peft")),
          fmt(r.get("ops_per_adapted_layer"), ".1f")] for r in rows])
    groups = [g for g in GROUPS if any(r["groups"].get(g) for r in rows)]
    by_group = table(["config", *groups], [[r["config"], *[f"{r['groups'].get(g, 0):.0f}" for g in groups]]
                                           for r in rows])
    zones = []
    for r in rows:
        growth = r.get("zone_ops_per_adapted_layer", {})
        cells = []
        for zone, n in list(r["zones"].items())[:top]:
            per_layer = growth.get(zone, 0.0)
            cells.append(f"{n:.0f} {zone}" + (f" (**{per_layer:.1f}/layer**)" if per_layer >= 0.5 else ""))
        zones.append([r["config"], "<br>".join(cells)])
    return "\n\n".join([counts, by_group, table(["config", f"top {top} zones, ops per cycle (growth per adapted "
                                                          "layer where >= 0.5)"], zones)]) + "\n"


def uncommitted_changes() -> list[str]:
    """Files of the measured code that differ from the commit recorded (``git status``; empty in an
    exported snapshot): counts are of the working tree, which may be ahead of its commit."""
    result = subprocess.run(["git", "status", "--porcelain", "--", "ds_bilevel", "bench", "launch"], cwd=REPO,
                            capture_output=True, text=True)
    return [line[3:] for line in result.stdout.splitlines()] if result.returncode == 0 else []


def without_output_dir(argv: list[str]) -> list[str]:
    """train.py flags as recorded: the temporary run folder is gone once the benchmark ends."""
    at = argv.index("--output_dir")
    return argv[:at] + argv[at + 2:]


def options_for(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench step_ops", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama", help="model of every configuration: a builtin "
                        "name or an HF folder")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--ds_config", default="ds_configs/cpu_zero2.json", help="DeepSpeed config of every "
                        "configuration")
    parser.add_argument("--out", default=str(RESULTS.relative_to(REPO)), help="folder for step_ops.json (a relative "
                        "path: from the repository root)")
    parser.add_argument("--unroll", type=int, default=1, help="T1: inner steps per outer step of the bi-level "
                        "configurations (a cycle is T1 inner steps and the outer step)")
    parser.add_argument("--repeats", type=int, default=1, help="count every configuration this many times (the "
                        "counts must agree: 'deterministic')")
    parser.add_argument("--scaling_targets", default="q_proj,v_proj",
                        help="adapter.target_modules of the second count (growth per adapted layer); '' skips it")
    options = parser.parse_args(argv)
    unknown = set(options.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; allowed: {', '.join(CONFIGS)}")
    return options


def main(argv: list[str] | None = None) -> None:
    options = options_for(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="step_ops_") as folder:
        folder = Path(folder)
        plan = {"entries": plan_entries(options, folder), "out": str(folder / "counts.json")}
        (folder / "plan.json").write_text(json.dumps(plan))
        launch(Path(__file__).resolve(), ["--worker", str(folder / "plan.json")], ranks=1, timeout=1800)
        counted = json.loads((folder / "counts.json").read_text())
    rows = derive(counted, options.unroll)
    results = {"machine": machine(), "uncommitted_changes": uncommitted_changes(), "options": vars(options),
               "cycles_counted": CYCLES, "wall_s": time.time() - started, "rows": rows,
               # every count (the scaling counts and repeats too), without what the rows hold already
               "counts": [{**{k: v for k, v in c.items() if k not in ("zones", "aten")},
                           "argv": without_output_dir(c["argv"])} for c in counted]}
    out = REPO / options.out  # an absolute --out stays as given
    out.mkdir(parents=True, exist_ok=True)
    path = out / "step_ops.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"# python -m bench step_ops --model {options.model} ({results['machine']['date']}, commit "
          f"{results['machine']['commit'][:7]}, {results['wall_s']:.0f} s)\n")
    print(markdown(rows))
    print(f"results: {path}")


if __name__ == "__main__":
    worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
