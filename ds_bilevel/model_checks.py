"""Checks before launch of the model: its targets and ranks, data.max_length against its learned
positions, its folder's config.json and weights, and its tokenizer. ``validation.check_run``
calls them after the settings and the data checks.

The model is read as a skeleton on the meta device (no weight is read or allocated, so a 70B
folder costs a config read): accelerate's ``init_empty_weights`` around transformers' class for a
folder, and for a builtin LLaMA its module tree built here (``builtin_llama_skeleton``), so that a
bad adapter setting is refused without importing transformers' modelling code (issue 13). Each
check raises ``ValueError("model_name_or_path: ...")`` or names the adapter or data setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ds_bilevel.builtin.model import BUILTIN_MODELS, BUILTIN_PREFIX, builtin_names, is_builtin

if TYPE_CHECKING:
    from torch import nn

    from ds_bilevel.config import RunConfig


def builtin_vocab_size() -> int:
    """The builtin tokenizer's vocabulary (what ``len(load_tokenizer(builtin))`` gives, the model's
    embedding rows), read from its sentencepiece model without transformers."""
    import sentencepiece

    from ds_bilevel.builtin.tokenizer import TOKENIZER_DIR

    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model")).get_piece_size()


_SKELETON_CLASSES: dict[str, type] = {}


def _node(class_name: str, **children) -> nn.Module:
    """A module of class ``class_name`` (transformers' name, made here) holding ``children`` in order."""
    from torch import nn

    if class_name not in _SKELETON_CLASSES:
        methods = {"get_output_embeddings": lambda self: self.lm_head} if class_name.endswith("ForCausalLM") else {}
        _SKELETON_CLASSES[class_name] = type(class_name, (nn.Module,), methods)
    module = _SKELETON_CLASSES[class_name]()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def builtin_llama_skeleton(name: str) -> nn.Module:
    """A builtin LLaMA as ``LlamaForCausalLM`` lays it out, on the meta device: the same module
    names and class names, linear layers and parameter shapes, and its output head
    (get_output_embeddings), with no forward. All the target and rank checks read, built without
    importing transformers' modelling code (about 3 s of a refused launch); tests/test_startup.py
    compares it with transformers' own meta-device model for every builtin LLaMA."""
    import torch
    from torch import nn

    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:  # builtin_llama_config's message
        raise ValueError(f"model_name_or_path: unknown builtin {name!r}; builtins are {builtin_names()}")
    shape = BUILTIN_MODELS[key]
    hidden, inner, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    kv = shape.get("num_key_value_heads", heads) * head_dim
    vocab = shape.get("vocab_size") or builtin_vocab_size()

    def norm() -> nn.Module:
        module = _node("LlamaRMSNorm")
        module.weight = nn.Parameter(torch.empty(hidden))
        return module

    with torch.device("meta"):
        layers = nn.ModuleList(_node(
            "LlamaDecoderLayer",
            self_attn=_node("LlamaAttention", q_proj=nn.Linear(hidden, heads * head_dim, bias=False),
                            k_proj=nn.Linear(hidden, kv, bias=False), v_proj=nn.Linear(hidden, kv, bias=False),
                            o_proj=nn.Linear(heads * head_dim, hidden, bias=False)),
            mlp=_node("LlamaMLP", gate_proj=nn.Linear(hidden, inner, bias=False),
                      up_proj=nn.Linear(hidden, inner, bias=False), down_proj=nn.Linear(inner, hidden, bias=False),
                      act_fn=_node("SiLUActivation")),
            input_layernorm=norm(), post_attention_layernorm=norm()) for _ in range(shape["num_hidden_layers"]))
        # Given its weight: Embedding's own init (normal_) on the meta device would import torch._dynamo.
        embedding = nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))
        model = _node("LlamaModel", embed_tokens=embedding, layers=layers, norm=norm(),
                      rotary_emb=_node("LlamaRotaryEmbedding"))
        return _node("LlamaForCausalLM", model=model, lm_head=nn.Linear(hidden, vocab, bias=False))


def model_skeleton(run: RunConfig):
    """The model with every tensor on the meta device: its modules and shapes, no weights."""
    from accelerate import init_empty_weights

    from ds_bilevel.builtin.model import builtin_llama_config

    name = run.model_name_or_path
    if is_builtin(name):
        from transformers import LlamaForCausalLM

        from ds_bilevel.models import load_tokenizer

        config = builtin_llama_config(name, len(load_tokenizer(name)))
        with init_empty_weights():
            return LlamaForCausalLM._from_config(config)
    if not (Path(name) / "config.json").is_file():
        raise ValueError(f"model_name_or_path: {name!r} is neither a builtin nor a folder with config.json")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=run.trust_remote_code)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=run.trust_remote_code)
        # init_empty_weights gives every registered parameter a new meta tensor, which unties a tied
        # output head (GPT-2, OPT, Llama-3.2 1B/3B, Gemma): tied again, the file's single copy counts
        # for both names, as transformers loads it (before, every such folder was refused as lacking
        # lm_head.weight)
        skeleton.tie_weights()
        return skeleton
    except (ValueError, KeyError, OSError, ImportError) as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"model_name_or_path: {name!r} cannot be built as a causal LM ({type(error).__name__}: "
                         f"{detail}); allowed: a transformers causal-LM folder (trust_remote_code true for "
                         f"custom code)") from None


def check_model(run: RunConfig) -> bool:
    """Targets and ranks against the model's layers (an encoder's: its head excluded, heads.py); a
    folder's weights whole and naming exactly the skeleton's tensors, with its shapes. Returns
    whether the model is an encoder (heads.is_encoder), decided here once for the checks after it."""
    from ds_bilevel.adapters.inject import target_layer_names
    from ds_bilevel.models import encoder_skeleton

    builtin = is_builtin(run.model_name_or_path)
    if not builtin:
        check_config_json(Path(run.model_name_or_path))
    encoder = encoder_skeleton(run.model_name_or_path, run.trust_remote_code)  # heads.py: with its head
    if encoder is None:
        skeleton = builtin_llama_skeleton(run.model_name_or_path) if builtin else model_skeleton(run)
        target_layer_names(skeleton, run.adapter)
    elif run.data.format != "classification":
        raise ValueError(f"data.format: {run.data.format!r} needs a causal LM, but {run.model_name_or_path} is an "
                         f"encoder (heads.py); allowed with it: classification")
    else:
        from ds_bilevel.heads import head_names

        skeleton = encoder
        target_layer_names(encoder, run.adapter, exclude=head_names(encoder))
    check_max_length(run.data.max_length, getattr(skeleton, "config", None), run.model_name_or_path)
    if not builtin:
        check_model_weights(Path(run.model_name_or_path), skeleton, base_only=encoder is not None)
    return encoder is not None


# model_type -> where its learned (or fixed sinusoidal) position table starts: "pad" after the pad
# id (RoBERTa's position ids count from pad_token_id + 1), 0 at the first row. Each checked with a
# forward of a tiny model at the limit and one token past it (transformers 5.24). Not listed: rotary,
# ALiBi or relative positions (LLaMA, Mistral, GPT-NeoX, Falcon, BLOOM, ModernBERT, ...), which have
# no table to run past.
LEARNED_POSITIONS = {
    **dict.fromkeys(("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "roberta-prelayernorm",
                     "xmod", "ibert", "mpnet", "longformer"), "pad"),
    **dict.fromkeys(("bert", "megatron-bert", "distilbert", "albert", "electra", "mobilebert", "convbert", "deberta",
                     "deberta-v2", "xlm", "flaubert", "gpt2", "gpt_neo", "gpt_bigcode", "biogpt", "opt", "bart",
                     "mbart", "ctrl"), 0),
}


def position_limit(config) -> int | None:
    """The most tokens a model's position table holds, read from its config (no weights), or None
    when its positions are computed. A longer sequence indexes past the table: a crash in the
    first forward ("index 132 is out of bounds"), after the run has started and locked its folder."""
    start = LEARNED_POSITIONS.get(getattr(config, "model_type", None))
    if start is None:
        return None
    if config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None  # DeBERTa-v3: relative attention only, no absolute table
    if start == "pad":
        start = (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    return config.max_position_embeddings - start


def check_max_length(max_length: int, config, name: str) -> None:
    """data.max_length within the model's learned positions (position_limit); ``config`` None (a
    builtin LLaMA's skeleton: rotary) is not limited."""
    limit = None if config is None else position_limit(config)
    if limit is None or max_length <= limit:
        return
    rows = config.max_position_embeddings
    offset = f" less pad_token_id {rows - limit - 1} + 1" if rows > limit else ""
    raise ValueError(f"data.max_length: {max_length} exceeds {name}'s {limit} learned positions (model_type "
                     f"{config.model_type}: max_position_embeddings {rows}{offset}); allowed: at most {limit}")


def check_config_json(folder: Path) -> None:
    """config.json is a JSON object (transformers' own error for a damaged one is a traceback)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"model_name_or_path: {str(folder)!r} is neither a builtin nor a folder with config.json")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"model_name_or_path: {path} is not valid JSON ({error}); allowed: the config.json "
                         f"save_pretrained writes") from None
    if not isinstance(values, dict):
        raise ValueError(f"model_name_or_path: {path} holds a JSON {type(values).__name__}; allowed: an object")


def check_tokenizer(run: RunConfig, encoder: bool | None = None) -> None:
    """What the data code needs of the tokenizer (an EOS for a causal LM, a pad id): found here, not
    as a crash in tokenisation after launch (models.check_tokenizer). ``encoder``: check_model's
    answer (None: decided again)."""
    from ds_bilevel.models import check_tokenizer as check

    try:
        check(run.model_name_or_path, run.trust_remote_code, encoder)
    except Exception as error:  # transformers' own errors for missing or unreadable tokenizer files
        detail = " ".join(str(error).split())
        if isinstance(error, ValueError) and detail.startswith("model_name_or_path:"):
            raise
        raise ValueError(f"model_name_or_path: {run.model_name_or_path} has no tokenizer transformers can load "
                         f"({type(error).__name__}: {detail[:200]}); allowed: a folder with its tokenizer files "
                         f"(tokenizer.json or tokenizer.model, tokenizer_config.json)") from None


def check_model_weights(folder: Path, skeleton=None, base_only: bool = False) -> None:
    """Weights as safetensors, whole (a truncated download fails here in one line, not in torch),
    every shard of the index present, and, against the meta-device ``skeleton``: no tensor
    missing (transformers would fill it with random values), none unexpected, every shape the
    model's. ``base_only`` (an encoder): the classification head is not compared (heads.py)."""
    from ds_bilevel.integrity import check_safetensors, check_weights_folder

    files = check_weights_folder(folder, "model_name_or_path")
    if not files:
        raise ValueError(f"model_name_or_path: {folder} holds no *.safetensors weights; allowed: a folder written "
                         f"by save_pretrained (safetensors)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
            raise ValueError(f"model_name_or_path: {index} is not a valid index ({type(error).__name__}: {error}); "
                             f"allowed: the index save_pretrained writes") from None
        missing = sorted(str(name) for name in shards if not (folder / str(name)).is_file())
        if missing:
            raise ValueError(f"model_name_or_path: {folder / missing[0]} is missing ({len(missing)} of the "
                             f"{len(shards)} shards {index.name} lists); copy or download it again")
        files = [folder / str(name) for name in sorted(shards)]  # what transformers reads
    if skeleton is None:
        return
    header = {}
    for path in files:
        header.update((name, (entry["shape"], path.name)) for name, entry in check_safetensors(
            path, "model_name_or_path").items())
    compare_with_skeleton(folder, header, skeleton, base_only)


# Tensors of older checkpoints that today's models compute instead (rotary frequencies, GPT-2's
# causal mask): in a file, but never loaded.
IGNORED_FILE_TENSORS = (".inv_freq", ".attn.bias", ".attn.masked_bias", ".position_ids")


def compare_with_skeleton(folder: Path, header: dict, skeleton, base_only: bool) -> None:
    """The file's tensor names and shapes against the skeleton's state dict (tied weights: one
    of a group suffices; a base-model checkpoint's names without the prefix are the model's)."""
    import re

    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    if _has_conversion_mapping(skeleton):
        return  # transformers renames this family's checkpoint tensors on load (MoE experts): not comparable
    expected = {name: list(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    groups: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied = {name: names for names in groups.values() if len(names) > 1 for name in names}
    given = {}
    for name, (shape, file) in header.items():
        if prefix and name not in expected and f"{prefix}.{name}" in expected:
            name = f"{prefix}.{name}"
        given[name] = (shape, file)
    if base_only and prefix:
        expected = {k: v for k, v in expected.items() if k.startswith(prefix + ".")}
        given = {k: v for k, v in given.items() if k.startswith(prefix + ".")}
    ignore_missing = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or []]
    ignore_unexpected = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or []]
    missing = sorted(name for name in expected if name not in given
                     and not any(other in given for other in tied.get(name, ()))
                     and not any(p.search(name) for p in ignore_missing))
    unexpected = sorted(name for name in given if name not in expected and not name.endswith(IGNORED_FILE_TENSORS)
                        and not any(p.search(name) for p in ignore_unexpected))
    if missing:
        raise ValueError(f"model_name_or_path: {folder} lacks {len(missing)} of the model's weight tensors "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which transformers "
                         f"would fill with random values; copy or download the folder again")
    if unexpected:
        raise ValueError(f"model_name_or_path: {folder} holds {len(unexpected)} tensor(s) the model has no place "
                         f"for ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''} in "
                         f"{given[unexpected[0]][1]}): its config.json and weights are of different models")
    for name, (shape, file) in sorted(given.items()):
        if name in expected and shape != expected[name]:
            raise ValueError(f"model_name_or_path: {folder / file} holds {name} with shape {shape}, but config.json "
                             f"makes it {expected[name]}; its config.json and weights are of different models")


def _has_conversion_mapping(skeleton) -> bool:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4.x: no renaming on load
        return bool(getattr(skeleton, "_checkpoint_conversion_mapping", None))
    return bool(get_checkpoint_conversion_mapping(skeleton.config.model_type)
                or getattr(skeleton, "_checkpoint_conversion_mapping", None))
