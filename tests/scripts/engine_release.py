"""Run under the deepspeed launcher: launch/train.py's main() several times in this one process, as
bench/gpu_worker.py does, and record after each run how many DeepSpeed engines and causal-LM models
are still alive once the garbage collector has run. Writes OUT/release.json on rank 0.

The last case replaces BilevelEngine.close by a no-op: the control that shows what is left without it.
A ZeRO-3 case also records how many of its modules ZeRO-3's forward stack holds at the run's end."""

import gc
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # bench/
CASES = {
    "lora-zero2": ["--method", "lora", "--ds_config", "ds_configs/cpu_zero2.json"],
    "bidora-darts-zero3": ["--method", "bidora", "--hypergrad", "darts", "--ds_config", "ds_configs/cpu_zero3.json"],
    "bilora_sam-zero2": ["--method", "bilora_sam", "--ds_config", "ds_configs/cpu_zero2.json"],
    "peft-lora-zero3": ["--ds_config", "ds_configs/cpu_zero3.json"],  # bench/peft_worker.py, the peer
    "lora-zero2-without-close": ["--method", "lora", "--ds_config", "ds_configs/cpu_zero2.json"],
}


def alive() -> dict[str, int]:
    gc.collect()
    names = [type(o).__name__ for o in gc.get_objects()]
    return {"engines": names.count("DeepSpeedEngine"), "models": names.count("LlamaForCausalLM")}


def main(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from deepspeed.runtime.zero import parameter_offload

    from ds_bilevel.engine import BilevelEngine

    # How many of the engine's modules ZeRO-3's forward stack holds when the run ends: the root only
    # (distributed.trim_forward_stack), not the modules each checkpointed recomputation left there
    stacked, close = {}, BilevelEngine.close

    def counting_close(self):
        ours = {id(m) for m in self.module.modules()}
        stacked["count"] = sum(id(m) in ours for m in parameter_offload.FWD_MODULE_STACK)
        close(self)

    BilevelEngine.close = counting_close
    results = {}
    for name, flags in CASES.items():
        if name.endswith("without-close"):
            BilevelEngine.close = lambda self: None
        argv = ["--model_name_or_path", "builtin:micro-llama", "--data.train_size", "32", "--data.eval_size", "4",
                "--micro_batch_size", "2", "--max_steps", "2", "--eval_steps", "0", "--output_dir", str(out / name),
                *flags]
        if name.startswith("peft"):
            from bench import peft_worker

            code = peft_worker.main([*argv, "--peft_method", "lora", "--warmup", "0"])
        else:
            code = train.main(argv)
        results[name] = {"exit": code, **alive()}
        if name.endswith("zero3") and not name.startswith("peft"):
            results[name]["stacked_at_close"] = stacked.pop("count")
    if os.environ.get("RANK", "0") == "0":
        (out / "release.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--"))))
