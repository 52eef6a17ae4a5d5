"""Typed run settings: one dataclass tree, read from YAML then the command line, validated here.

Precedence: dataclass defaults < the DeepSpeed JSON's concrete values (micro batch,
accumulation, clipping: taken by ``ds_config.settings_from_ds_config``) < ``--preset NAME`` (a YAML
file shipped in ds_bilevel/presets/, docs/methods.md "Presets") < ``--config run.yaml``
< command-line flags; ``RunConfig.sources`` records where each given setting came from. Nested
sections are addressed with a dot on the command line (``--adapter.rank 16``) and as
mappings in YAML (``adapter: {rank: 16}``). Unknown keys are rejected with the list
of valid ones.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ds_bilevel.settings_source import SECTIONS, Setting, settings

if typing.TYPE_CHECKING:  # imported on first use: they import torch, and --help must answer without it
    from ds_bilevel.adapters.config import AdapterConfig
    from ds_bilevel.bilevel_config import BilevelConfig
    from ds_bilevel.data import DataConfig

# Command-line names that stand for a nested field (the contract of launch/train.py).
ALIASES = {"method": "adapter.method", "hypergrad": "bilevel.hypergrad", "unroll_steps": "bilevel.unroll_steps",
           "split_ratio": "bilevel.split_ratio"}
LR_SCHEDULERS = ("linear", "cosine", "constant")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"



def section_class(name: str) -> type:
    """The dataclass of the nested section ``name`` (adapter, data, bilevel), imported now."""
    module, cls = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str):  # ``from ds_bilevel.config import AdapterConfig`` still works
    for section, (_, cls) in SECTIONS.items():
        if name == cls:
            return section_class(section)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RunConfig:
    model_name_or_path: str = "builtin:tiny-llama"
    """An HF model folder (config.json + weights) or a builtin name (builtin:tiny-llama)."""
    dataset: str = "builtin:instruct"
    """A local .jsonl/.json/.csv/.parquet file with prompt/response fields, or builtin:instruct."""
    output_dir: str = "runs/default"
    """Where the run writes its adapters, metrics and summary."""
    ds_config: str = "ds_configs/cpu_zero2.json"
    """DeepSpeed JSON config; its "auto" values are filled from these settings, and its concrete
    batch sizes and clipping fill those not given as a flag or in the YAML (a conflict is refused)."""
    max_steps: int = 300
    """Inner optimizer steps to train (one step = one global batch; bi-level methods add outer steps)."""
    seed: int = 0
    """Seeds the builtin model and data, the adapter init and the batch order."""
    micro_batch_size: int = 8
    """Examples per rank per forward (DeepSpeed's train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 2
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 2e-3
    """Peak learning rate of the adapter parameters."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1 of both levels (HF's name; the released BiDoRA code uses 0.9 at both levels)."""
    adam_beta2: float = 0.999
    """AdamW beta2 of both levels (HF's name; the released BiDoRA code uses 0.98 at both levels)."""
    adam_epsilon: float = 1e-8
    """AdamW eps of both levels (HF's name; the released BiDoRA code uses 1e-6 at both levels)."""
    warmup_ratio: float = 0.1
    """Share of max_steps spent warming the learning rate up linearly, step k of w at (k+1)/(w+1) of the peak."""
    lr_scheduler: str = "linear"
    """Decay after warm-up: linear | cosine | constant."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping of the inner level's steps (and of Bi-LoRA's joint step; of the outer
    level's too unless bilevel.outer_max_grad_norm says otherwise); 0 turns it off. Fills DeepSpeed's
    gradient_clipping."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (transformers' gradient checkpointing, non-reentrant)."""
    use_liger_kernel: bool = False
    """Liger Kernel's Triton RMSNorm, RoPE and SwiGLU on a LLaMA/Mistral/Qwen2 model (the name HF
    Trainer uses); needs a CUDA GPU and `pip install ".[gpu]"` (ds_bilevel/kernels.py)."""
    torch_compile: bool = False
    """torch.compile each decoder layer (regional compilation); CUDA GPU only (ds_bilevel/kernels.py)."""
    linear_cross_entropy: bool = False
    """A causal LM's training loss from the last hidden states, the output projection and the
    cross-entropy computed together per chunk of tokens (ds_bilevel/loss_head.py): the (B, T, V)
    logits and their gradient never exist (2.1 GB each at 8192 tokens x 128256 vocabulary in
    bf16), for one more projection per chunk in backward. Exact to fp32 rounding. On with
    use_liger_kernel (Liger's fused kernel, as HF Trainer does)."""
    eval_steps: int = 50
    """Evaluate every N inner steps, besides before and after training (0: only those two)."""
    eval_batch_size: int = 32
    """Examples per rank per evaluation forward."""
    eval_before_training: bool = True
    """Evaluate before the first step: the summary's "before" numbers, step 0 of metrics.jsonl, and a
    stop before training when the loss is not finite (NaN weights). false: the first step comes one
    pass over the evaluation set sooner, and those numbers are null."""
    log_steps: int = 10
    """Write a metrics line every N steps."""
    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that already holds a run."""
    trust_remote_code: bool = False
    """Passed to transformers when loading a model folder; off unless you trust the folder."""
    save_steps: int = 0
    """Save a DeepSpeed checkpoint (both levels, optimizers, schedules, data position, RNG)
    every N inner steps and at the last step into output_dir/checkpoints (0: none)."""
    resume_from_checkpoint: str = ""
    """"latest" (output_dir/checkpoints) or a checkpoint folder to resume from; the run then
    ends exactly where an uninterrupted one would (a finished run resumed with a larger
    max_steps trains further, its learning rate scheduled over the new max_steps)."""
    checksum_base: bool = False
    """Write a sha256 of the frozen base weights into summary.json (proves they never moved)."""
    collective_timeout_s: int = 1800
    """A rank that waits this long without progress (a peer died, hangs or is unreachable)
    stops the run with an error naming the silent ranks; also the process group's timeout."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradients are not finite is skipped and counted; this many in a
    row stop the run with an error."""
    adapter: AdapterConfig = field(default_factory=lambda: section_class("adapter")())
    data: DataConfig = field(default_factory=lambda: section_class("data")())
    bilevel: BilevelConfig = field(default_factory=lambda: section_class("bilevel")())
    # Not a setting: where each given setting came from ({"micro_batch_size": "the command line",
    # ...}), so that a DeepSpeed JSON value fills only what was not given and a conflict names
    # both sides. None (a RunConfig built in code): every setting counts as given.
    sources: typing.ClassVar[dict[str, str] | None] = None

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    def validate(self) -> None:
        """Check every setting; raise ValueError('<field>: <bad value> ...<allowed>')."""
        self.adapter.validate()
        self.data.validate()
        self.bilevel.validate()
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "eval_batch_size",
                     "log_steps", "collective_timeout_s", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: {value!r} must be an integer >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: {self.learning_rate!r} must be > 0")
        for name in ("weight_decay", "max_grad_norm", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be >= 0")
        for name in ("use_liger_kernel", "torch_compile", "linear_cross_entropy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {getattr(self, name)!r} must be true or false")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be in [0, 1)")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon: {self.adam_epsilon!r} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: {self.warmup_ratio!r} must be in [0, 1)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler: {self.lr_scheduler!r} is not one of {list(LR_SCHEDULERS)}")
        # The registry came in with AdapterConfig (the sections import torch; --help reads the source).
        from ds_bilevel.adapters.registry import METHODS

        retraining = sorted(name for name, entry in METHODS.items() if entry.retraining)
        if self.bilevel.retrain_steps and self.adapter.method not in retraining:
            raise ValueError(f"bilevel.retrain_steps: {self.bilevel.retrain_steps} needs a bi-level adapter.method "
                             f"({', '.join(retraining)}), not {self.adapter.method!r}; allowed: 0")
        if not Path(self.ds_config).is_file():
            raise ValueError(f"ds_config: file {self.ds_config!r} does not exist")


# ---- reading settings ----------------------------------------------------------------------
def _fields(cls) -> dict[str, tuple[type, dataclasses.Field]]:
    classes = {cls_name: section_class(name) for name, (_, cls_name) in SECTIONS.items()} if cls is RunConfig else {}
    hints = typing.get_type_hints(cls, localns=classes)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def flat_field_types(cls=RunConfig, prefix: str = "") -> dict[str, type]:
    """{'max_steps': int, 'adapter.rank': int, ...} for every leaf setting."""
    out = {}
    for name, (hint, _) in _fields(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(flat_field_types(hint, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def _converter(hint):
    if hint is bool:
        return _parse_bool
    if typing.get_origin(hint) is list:
        return lambda text: [item for item in text.split(",") if item]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _check_type(key: str, value, hint) -> object:
    """Coerce YAML values (ints given for floats, strings for lists) and refuse wrong types."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(hint) is list:
        value = value.split(",") if isinstance(value, str) else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


# ---- the command line: its help is read from the settings' source, without importing torch ----------
def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) if value else '""'
    return '""' if value == "" else "unset" if value is None else str(value)


def _help(setting: Setting) -> str:
    kind = {"bool": "true, false", "int": "an integer", "float": "a number"}.get(setting.type, "")
    if setting.type.startswith("list"):
        allowed = "a comma-separated list"
    elif setting.choices:
        allowed = ", ".join(setting.choices)
    elif setting.type == "bool" or not setting.rule:
        allowed = kind
    else:  # "an integer >= 1", or "a number" + "in [0, 1)"
        allowed = f"{kind} {setting.rule}" if setting.rule.startswith(("<", ">", "in ")) else setting.rule
    text = f"{setting.doc} [default: {_shown(setting.default)}{'; allowed: ' + allowed if allowed else ''}]"
    return text.replace("%", "%%")


def _flag_converter(type_name: str):
    if type_name.startswith("list"):
        return _converter(list[str])
    return {"bool": _parse_bool, "int": int, "float": float}.get(type_name, str)


def closest_flag(flag: str) -> str | None:
    """The setting a mistyped flag most likely meant: a leaf name (--rank: --adapter.rank), initials
    (--lr: --learning_rate), a close spelling (--max_step: --max_steps), then a prefix."""
    name = flag.lstrip("-").split("=", 1)[0]
    keys = [s.key for s in settings()] + list(ALIASES)
    leaves = {key.rsplit(".", 1)[-1]: key for key in reversed(keys)}  # a top-level key wins over a leaf
    initials = {"".join(word[0] for word in leaf.split("_") if word): key for leaf, key in leaves.items()}
    for table in (leaves, initials):
        if name in table:
            return f"--{table[name]}"
    close = difflib.get_close_matches(name, keys + list(leaves), n=1, cutoff=0.6)
    if close:
        return f"--{leaves.get(close[0], close[0])}" if close[0] not in keys else f"--{close[0]}"
    prefixed = [key for key in keys if key.startswith(name) or key.rsplit(".", 1)[-1].startswith(name)]
    return f"--{prefixed[0]}" if prefixed else None


class _HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # all-linear stays whole


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [e for e in extras if e.startswith("-")]
            hint = closest_flag(flags[0]) if flags else None
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {hint}?)" if hint else ""))
        return namespace

    def error(self, message: str):
        """A bad flag is a ValueError like any bad setting: one line, exit code 2 (launch/train.py)."""
        raise ValueError(f"{message}; see --help for the settings")


def build_parser() -> argparse.ArgumentParser:
    """The command line of launch/train.py: one flag per setting, with its docstring, default and
    allowed values as help; no prefix abbreviations. Imports nothing heavy (--help answers at once)."""
    parser = _Parser(description="Train an adapter with DeepSpeed (ds_bilevel). Every setting below is a "
                     "flag, also settable in a YAML file given with --config (nested: adapter: {rank: 16}); "
                     "precedence: defaults < the DeepSpeed JSON's batch sizes < preset < YAML < flags. "
                     "docs/usage.md explains them.",
                     usage="%(prog)s [-h] [--preset NAME] [--config YAML] [--SETTING VALUE ...]",
                     argument_default=argparse.SUPPRESS, allow_abbrev=False, formatter_class=_HelpFormatter)
    parser.add_argument("--preset", metavar="NAME", help=f"the settings a paper or its released code used "
                        f"({', '.join(preset_names())}; docs/methods.md, \"Presets\"); --config and flags override "
                        f"them")
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings; command-line flags override it")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher")
    groups = {"": parser.add_argument_group("run settings")}
    for name in SECTIONS:
        groups[name] = parser.add_argument_group(f"{name} settings (--{name}.*)")
    for setting in settings():
        names = [f"--{setting.key}"] + [f"--{a}" for a, target in ALIASES.items() if target == setting.key]
        metavar = ("{" + ",".join(setting.choices) + "}" if setting.choices else
                   "{true,false}" if setting.type == "bool" else setting.key.rsplit(".", 1)[-1].upper())
        groups[setting.key.rpartition(".")[0]].add_argument(
            *names, dest=setting.key, type=_flag_converter(setting.type), metavar=metavar, help=_help(setting))
    return parser


def load_config(argv: list[str] | None = None) -> RunConfig:
    """Defaults < preset < YAML < command line; then validate. Raises ValueError on any bad setting."""
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    values, sources = {}, {}
    if "preset" in args:
        name = args.pop("preset")
        values.update(read_preset(name))
        sources.update(dict.fromkeys(values, f"the preset {name}"))
    if "config" in args:
        path = args.pop("config")
        given = read_yaml(path)
        values.update(given)
        sources.update(dict.fromkeys(given, f"the config file {path}"))
    values.update(args)
    sources.update(dict.fromkeys(args, "the command line"))
    return config_from_flat(values, sources)


def preset_names() -> list[str]:
    """The presets shipped with the package (ds_bilevel/presets/<name>.yaml)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def read_preset(name: str) -> dict:
    """A preset's settings, flat ({"adapter.rank": 4, ...}); an unknown name is refused in one line."""
    if name not in preset_names():
        raise ValueError(f"preset: {name!r} is not one of {preset_names()}")
    return read_yaml(str(PRESETS_DIR / f"{name}.yaml"))


def read_yaml(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"config: file {path!r} does not exist")
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping of settings")
    return {ALIASES.get(k, k): v for k, v in _flatten(loaded).items()}


def config_from_flat(values: dict, sources: dict[str, str] | None = None) -> RunConfig:
    """A validated RunConfig from {flat key: value}; ``sources`` says where each came from
    (default: "the settings given"), recorded in ``RunConfig.sources``."""
    types = flat_field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid settings are {sorted(types)}")
    config = RunConfig()
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        target = getattr(config, section) if section else config
        setattr(target, leaf, _check_type(key, value, types[key]))
    config.sources = {key: (sources or {}).get(key, "the settings given") for key in values}
    config.validate()
    return config


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a settings dataclass (litgpt's convention)."""
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(after.value.value.split())
            for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)}


def settings_markdown() -> str:
    """The settings table of docs/usage.md: ``python -m ds_bilevel.config`` prints it."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for setting in settings():
        default = setting.default
        shown = ",".join(default) if isinstance(default, list) else default
        text = setting.doc.replace(" | ", " / ").replace("||", "‖")
        rows.append(f"| `{setting.key}` | `{shown}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
