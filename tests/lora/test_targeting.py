"""Targeting as PEFT does it: a regex on the whole module path, exclusions, layers, and per-module
rank / alpha patterns; adapters made with them load in PEFT with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf.models import apply_hf_lora, load_hf_model, parse_targets
from minituner.lora import lora_layers, resolve_target_modules
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.lora.targets import layer_index, target_spec
from minituner.training.config import FinetuneConfig, parse_layers

LLAMA_REGEX = r"model\.layers\.\d+\.self_attn\.(q|v)_proj"
CASES = {
    "regex": {"target_modules": LLAMA_REGEX},
    "exclude": {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]},
    "exclude_regex": {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"},
    "layers": {"target_modules": ["q_proj", "v_proj", "up_proj"], "layers_to_transform": [1]},
    "patterns": {"target_modules": "all-linear", "rank_pattern": {"q_proj": 2, "mlp.up_proj": 6},
                 "alpha_pattern": {"v_proj": 3.0}},
}


def _llama(toy_hf_model):
    return toy_hf_model("llama")


def test_regex_is_a_full_match_on_the_path(toy_hf_model):
    model = load_hf_model(_llama(toy_hf_model))
    names = resolve_target_modules(model, LLAMA_REGEX)
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_a_regex_that_matches_nothing_lists_the_paths_it_tried(toy_hf_model):
    model = load_hf_model(_llama(toy_hf_model))
    with pytest.raises(ValueError, match=r"matches no Linear module path.*tried against: \[") as e:
        resolve_target_modules(model, r".*\.nothing_here")
    assert "model.layers.0.self_attn.q_proj" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="q_proj.*matches no Linear"):
        resolve_target_modules(model, r"q_proj")  # a full match: the bare leaf is no path


def test_exclude_and_layers_narrow_the_targets(toy_hf_model):
    model = load_hf_model(_llama(toy_hf_model))
    every = resolve_target_modules(model, "all-linear")
    kept = resolve_target_modules(model, "all-linear", exclude_modules=["down_proj"])
    assert kept == [n for n in every if not n.endswith("down_proj")]
    layer1 = resolve_target_modules(model, "all-linear", layers_to_transform=[1])
    assert layer1 and all(layer_index(n) == 1 for n in layer1)
    with pytest.raises(ValueError, match="excludes none"):
        resolve_target_modules(model, "all-linear", exclude_modules=["lm_head"])
    with pytest.raises(ValueError, match="selects no targeted module"):
        resolve_target_modules(model, "all-linear", layers_to_transform=[99])


def test_cli_forms():
    assert target_spec(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert target_spec([LLAMA_REGEX]) == LLAMA_REGEX
    assert target_spec(["all-linear"]) == "all-linear"
    with pytest.raises(ValueError, match="one regex"):
        target_spec(["q_proj", ".*v_proj"])
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    for bad in ("2-1", "a", "1-", "-1"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)
    with pytest.raises(ValueError, match="--layers"):
        FinetuneConfig.for_kind("hf", model="hf:x", layers="x").validate()


def test_patterns_set_each_layers_rank_and_alpha(toy_hf_model):
    model = apply_hf_lora(load_hf_model(_llama(toy_hf_model)), **CASES["patterns"], r=4,
                          alpha=8)
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].r == 2
    assert layers["model.layers.0.mlp.up_proj"].r == 6
    assert layers["model.layers.0.self_attn.k_proj"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].alpha == 3.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_loads_in_peft_with_the_same_logits(case, toy_hf_model, tmp_path):
    peft = pytest.importorskip("peft")
    directory, ids = _llama(toy_hf_model), token_batch()
    settings = dict(CASES[case])
    model = apply_hf_lora(load_hf_model(directory), settings.pop("target_modules"), r=4, alpha=8,
                          seed=0, **settings)
    randomize_lora_b(model)
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "adapter")
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))}
    assert wrapped == {n for n, _ in lora_layers(model)}
    assert torch.allclose(logits_of(peft_model, ids), expected, atol=1e-5)
    again = load_adapter(load_hf_model(directory), tmp_path / "adapter")
    assert torch.allclose(logits_of(again, ids), expected, atol=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["minituner"]["target_modules_requested"] == CASES[case]["target_modules"]
