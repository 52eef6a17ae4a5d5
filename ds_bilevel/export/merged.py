"""``merged``: the base with every adapter folded in, as a plain HF model folder.

The base is streamed one tensor at a time. An adapted layer's weight W0 is wrapped in the
method's own adapter layer with its trained tensors and replaced by ``merged_weight()``
(LoRA W0 + s B A; DoRA/BiDoRA m (W0 + s B A) / ||W0 + s B A||_row; BiLoRA
W0 + s P diag(lambda) Q; Bi-LoRA the primary module only), in fp32, then cast. An encoder
run's trained classification head replaces the base's head tensors, at the run's label count
when the base was a classifier for another (or is added after them, for a masked-LM base that
has none). Every other tensor is copied through, cast to the export dtype. Shards are written as
they fill.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ds_bilevel.export.base_source import Base, TensorSpec
from ds_bilevel.export.run_folder import ADAPTER_FILE, AdapterFile, ExportError
from ds_bilevel.export.shards import write_sharded


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def adapted_weights(adapters: AdapterFile, specs: list[TensorSpec], conv1d: frozenset[str] = frozenset()
                    ) -> dict[str, str]:
    """{base weight name: adapted layer name}, after checking every layer against the base
    (names and shapes, on the meta device) so that a mismatch stops the export before it writes.
    ``conv1d``: the layers stored (in, out), transformers' Conv1D."""
    by_name = {spec.name: spec for spec in specs}
    weights = {}
    for layer in adapters.layers:
        spec = by_name.get(f"{layer}.weight")
        if spec is None and "." in layer:
            # A base saved without its model's prefix (GPT-2 as published: h.0.attn.c_attn.weight, where
            # the causal LM names it transformer.h.0...): transformers adds the prefix at load, so the
            # merged folder keeps the base's names and loads the same way.
            spec = by_name.get(f"{layer.split('.', 1)[1]}.weight")
        if spec is None or len(spec.shape) != 2:
            raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} adapts layer {layer}, but the base has no 2-D "
                              f"tensor {layer}.weight (a weight tied to another, or another base model?)")
        adapters.layer(layer, torch.empty(spec.shape, device="meta"), load_values=False,
                       fan_in_fan_out=layer in conv1d)
        weights[spec.name] = layer
    return weights


def base_label_count(base: Base) -> int | None:
    """How many labels the base's own classification head was saved for (its config.json's
    ``id2label``, as transformers counts ``num_labels``), or None for a builtin base, which is built
    with the run's labels."""
    if base.folder is None:
        return None
    values = json.loads((base.folder / "config.json").read_text())
    return len(values["id2label"]) if isinstance(values.get("id2label"), dict) else int(values.get("num_labels", 2))


def relabelled(trained: tuple[int, ...], saved: tuple[int, ...], base: Base) -> bool:
    """Whether a head tensor the base holds at shape ``saved`` was saved for another label count
    than the run's and the trained one replaces it: a base fine-tuned as a classifier (an MNLI
    checkpoint's 3 labels, on a 2-label task). Training loads it so on purpose
    (models.load_classifier: ignore_mismatched_sizes, the mismatched rows drawn afresh and trained
    whole), so only the label dimension may differ: the first, rows of the base's label count
    against the run's, the rest the same (classifier.out_proj.weight (3, H) -> (2, H), its bias).
    Any other difference is another base. Before, such a run's merged export was refused."""
    labels = len(base.config.get("id2label") or {})  # the run's (base_source.classifier_config)
    return (len(trained) == len(saved) >= 1 and trained[1:] == saved[1:] and trained[0] == labels
            and saved[0] == base_label_count(base) != labels)


def output_specs(base: Base, adapters: AdapterFile | None) -> list[TensorSpec]:
    """The merged folder's tensors, in the order output_tensors yields them: the base's, a head
    tensor the run relabelled at its trained shape (relabelled), then the head tensors the base
    lacks (a masked-LM base). A head tensor the base holds at another shape is refused."""
    head = adapters.head if adapters is not None else {}
    specs = []
    for spec in base.source.specs:
        trained = tuple(head[spec.name].shape) if spec.name in head else spec.shape
        if trained != spec.shape and not relabelled(trained, spec.shape, base):
            raise ExportError(f"checkpoint_dir: {ADAPTER_FILE} holds head tensor {spec.name} of shape {trained}, "
                              f"but the base's is {spec.shape} (another base model?)")
        specs.append(TensorSpec(spec.name, trained, spec.dtype))
    return specs + head_specs(base, adapters)


def head_specs(base: Base, adapters: AdapterFile | None) -> list[TensorSpec]:
    """The trained head's tensors the base lacks (a masked-LM base has no classifier)."""
    head = adapters.head if adapters is not None else {}
    names = {spec.name for spec in base.source.specs}
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in head.items() if name not in names]


def output_tensors(base: Base, adapters: AdapterFile | None, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors in order, adapted weights merged (in fp32), the trained head in place of
    the base's, then the head tensors the base lacks; floats cast to ``dtype``."""
    from tqdm.auto import tqdm

    adapted = adapted_weights(adapters, base.source.specs, base.conv1d) if adapters is not None else {}
    head = adapters.head if adapters is not None else {}
    extra = [(spec.name, head[spec.name]) for spec in head_specs(base, adapters)]
    tensors = tqdm(base.source.tensors(), total=len(base.source.specs), desc="export", unit="tensor",
                   disable=None, leave=False)
    for name, tensor in itertools.chain(tensors, extra):  # streamed: one base tensor at a time
        if name in adapted:
            conv1d = adapted[name] in base.conv1d
            with torch.no_grad():
                merged = adapters.layer(adapted[name], tensor, fan_in_fan_out=conv1d).merged_weight()
            tensor = merged.T if conv1d else merged  # merged_weight is (out, in); Conv1D stores (in, out)
        tensor = head.get(name, tensor)
        yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def write_config(base: Base, folder: Path, dtype: torch.dtype) -> None:
    config = {**base.config, "dtype": dtype_name(dtype)}
    if "torch_dtype" in config:  # written by transformers 4; keep both readers right
        config["torch_dtype"] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if base.generation_config:
        (folder / "generation_config.json").write_text(json.dumps(base.generation_config, indent=2) + "\n")
    if base.folder is not None and "auto_map" in config:  # custom modelling code travels with the config
        for code in base.folder.glob("*.py"):
            shutil.copy2(code, folder / code.name)


# The tokenizer files an HF folder ships (sentencepiece, BPE, WordPiece, tiktoken; the chat template
# in its own file or in tokenizer_config.json), copied byte for byte: re-saving through transformers
# drops tokenizer.model (llama.cpp's converter needs it for sentencepiece vocabularies) and writes a
# tokenizer_config.json that older transformers cannot read.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*",
                   "merges.txt", "*.model", "*.tiktoken")
TOKENIZER_FOLDERS = ("additional_chat_templates",)


def write_tokenizer(base: Base, folder: Path) -> None:
    """The base's tokenizer files as they are, or, for a base without them (a builtin), the run's
    tokenizer saved by transformers."""
    files = sorted({path for pattern in TOKENIZER_FILES for path in base.folder.glob(pattern) if path.is_file()}
                   ) if base.folder is not None else []
    if not files:
        base.tokenizer.save_pretrained(str(folder))
        return
    for path in files:
        shutil.copyfile(path, folder / path.name)
    for name in TOKENIZER_FOLDERS:
        if (base.folder / name).is_dir():
            shutil.copytree(base.folder / name, folder / name)


def write_model_folder(base: Base, adapters: AdapterFile | None, folder: Path, dtype: torch.dtype,
                       max_bytes: int) -> list[str]:
    """A folder that AutoModelForCausalLM.from_pretrained (AutoModelForSequenceClassification, for
    an encoder run) loads: config, generation config, tokenizer and sharded weights (the base's,
    merged with ``adapters`` unless None)."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = output_specs(base, adapters)
    files = write_sharded(output_tensors(base, adapters, dtype), specs, dtype, folder, max_bytes)
    write_config(base, folder, dtype)
    write_tokenizer(base, folder)
    return files


def export_merged(adapters: AdapterFile, base: Base, folder: Path, dtype: torch.dtype, max_bytes: int) -> list[str]:
    if "quantization_config" in base.config:
        raise ExportError("format: merged needs an unquantized base (its config.json has a quantization_config); "
                          "use --format peft")
    return write_model_folder(base, adapters, folder, dtype, max_bytes)
