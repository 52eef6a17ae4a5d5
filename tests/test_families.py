"""The model families users have (issue 16): default targets (all-linear), GPT-2's Conv1D layers in
every method, Mixtral's fused experts refused by name, and exact exports of each family, on tiny
random folders built here (tests/families.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import CAUSAL, ENCODERS, causal_lm, classifier, save_causal_folder
from numerics import randomize, rel_err
from peft import PeftModel
from run_folders import write_run
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ds_bilevel.adapters import AdapterConfig, AdapterLayer, inject_adapters, merge_adapters
from ds_bilevel.adapters.inject import layer_kinds, target_layer_names
from ds_bilevel.config import RunConfig
from ds_bilevel.export import export
from ds_bilevel.heads import head_names
from ds_bilevel.levels import Level, adapter_layers

METHODS = ["lora", "dora", "bilora", "bidora", "bilora_sam"]



TOKENS = torch.randint(4, 400, (2, 11), generator=torch.Generator().manual_seed(5))


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


# ---- 1. default targets ------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(CAUSAL))
def test_all_linear_is_the_default_and_leaves_the_output_head(family):
    model = causal_lm(family)
    config = AdapterConfig(rank=4)
    assert config.target_modules == ["all-linear"]
    names = target_layer_names(model, config)
    assert layer_kinds(names) == CAUSAL[family][3]
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert head not in names


@pytest.mark.parametrize("family", list(ENCODERS))
def test_all_linear_in_an_encoder_leaves_the_head_and_pooler(family):
    model = classifier(family)
    heads = head_names(model)
    assert list(heads) == ENCODERS[family][4]
    names = target_layer_names(model, AdapterConfig(rank=4), exclude=heads)
    assert layer_kinds(names) == ENCODERS[family][3]
    assert not any(n.startswith(h + ".") or n == h for n in names for h in heads)


def test_explicit_lists_still_select_and_all_linear_stands_alone():
    assert layer_kinds(target_layer_names(causal_lm("gpt2"), AdapterConfig(target_modules=["c_attn"]))) == {
        "c_attn": 2}
    assert target_layer_names(causal_lm("llama"), AdapterConfig(target_modules=["lm_head"])) == ["lm_head"]
    with pytest.raises(ValueError, match=r"^adapter.target_modules: \['all-linear', 'q_proj'\] mixes all-linear"):
        AdapterConfig(target_modules=["all-linear", "q_proj"]).validate()


def test_prepare_reports_the_adapted_layers(tmp_path):
    from ds_bilevel.data import DataConfig
    from ds_bilevel.preparation import prepare

    run = RunConfig(model_name_or_path="builtin:micro-llama", output_dir=str(tmp_path), gradient_checkpointing=False,
                    data=DataConfig(train_size=8, eval_size=4))
    adapted = prepare(run).adapted
    assert len(adapted) == 14 and layer_kinds(adapted) == CAUSAL["llama"][3]


# ---- 2. Conv1D (GPT-2) -------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_conv1d_layers_adapt_train_and_merge_in_every_method(method):
    base = causal_lm("gpt2")
    expected_base = logits(base)
    model = copy.deepcopy(base)
    names = inject_adapters(model, AdapterConfig(method=method, rank=4, alpha=8.0, aux_rank=3))
    assert len(names) == 8 and all(isinstance(model.get_submodule(n).base_layer, Conv1D) for n in names)
    assert rel_err(logits(model), expected_base) < 1e-6  # a no-op at init
    randomize(model, zero_auxiliary=True)
    model.train()
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    grads = [p.grad for _, layer in adapter_layers(model) for level in Level for _, p in layer.level_parameters(level)
             if not (method == "bilora_sam" and level is Level.OUTER)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    adapted = logits(model)
    assert rel_err(adapted, expected_base) > 0.05
    merged = merge_adapters(copy.deepcopy(model))
    assert all(isinstance(merged.get_submodule(n), Conv1D) for n in names)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert rel_err(logits(merged), adapted) < 1e-5


# ---- 3. Mixtral's experts ----------------------------------------------------------------------

@pytest.mark.parametrize("target", ["experts", "gate_up_proj"])
def test_mixtral_experts_are_refused_by_name_with_the_reason(target):
    with pytest.raises(ValueError, match=rf"^adapter.target_modules: '{target}' names model.layers.0.mlp.experts"
                                         rf".*3-D.*\(experts fused into one tensor"):
        target_layer_names(causal_lm("mixtral"), AdapterConfig(target_modules=["q_proj", target]))


# ---- exports of every family -------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = save_causal_folder(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


CASES = [(family, method) for family in CAUSAL for method in ("lora", "bidora")]
CASES += [("gpt2", method) for method in ("dora", "bilora", "bilora_sam")]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_gpt2_base_saved_without_its_prefix_exports(method, tmp_path):
    """GPT-2 as published holds h.0.attn.c_attn.weight, not transformer.h.0...: both exports still
    reproduce the adapted model, and the merged folder keeps the base's names."""
    from families import config_of, write_tokenizer_files
    from safetensors import safe_open
    from transformers import GPT2Model

    base_dir = tmp_path / "gpt2-bare"
    torch.manual_seed(0)
    GPT2Model(config_of("gpt2")).save_pretrained(base_dir)
    write_tokenizer_files(base_dir)
    expected, run_dir = adapted_run(base_dir, AdapterConfig(method=method, rank=4, alpha=8.0), tmp_path)
    merged_dir = export(run_dir, tmp_path / "merged", "merged", "float32")
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()  # noqa: SIM118 (safe_open is not a dict)
    peft_dir = export(run_dir, tmp_path / "peft", "peft")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    errors = {"merged": rel_err(logits(merged), expected), "peft": rel_err(logits(peft.eval()), expected)}
    assert max(errors.values()) < 1e-5, errors


def adapted_run(base_dir, adapter: AdapterConfig, tmp_path):
    """The base with random adapters (Bi-LoRA's auxiliary zero, as at inference): its logits, and
    its run folder as training would leave it."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    inject_adapters(model, adapter)
    randomize(model, zero_auxiliary=True)
    run_dir = write_run(tmp_path / "run", model, RunConfig(model_name_or_path=str(base_dir),
                                                          output_dir=str(tmp_path / "run"), adapter=adapter))
    return logits(model), run_dir


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("family", "method"), CASES)
def test_merged_and_peft_exports_reproduce_the_adapted_model(family, method, folders, tmp_path):
    base_dir = folders(family)
    expected, run_dir = adapted_run(base_dir, AdapterConfig(method=method, rank=4, alpha=8.0, aux_rank=3),
                                    tmp_path)
    merged_dir = export(run_dir, tmp_path / "merged", "merged", "float32")
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    peft_dir = export(run_dir, tmp_path / "peft", "peft")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_dir)
    errors = {"merged": rel_err(logits(merged.eval()), expected), "peft": rel_err(logits(peft.eval()), expected)}
    print(f"{family} {method} {errors}")
    assert max(errors.values()) < 1e-5, errors
