"""DoRA on transformers models against PEFT's use_dora, both ways: GPT-2 (Conv1D) and Llama."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf import apply_hf_lora, load_hf_model
from minituner.lora import DoRALinear, lora_layers, merge_lora, unmerge_lora
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.util.files import load_safetensors

peft = pytest.importorskip("peft")
PEFT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def scale_magnitudes(model, factor: float = 1.1) -> None:
    """Move every magnitude off ||W||_c, as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in name:
                param.mul_(factor)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_minituner_dora_adapter_loads_in_peft(arch, tmp_path, toy_hf_model):
    directory, ids = toy_hf_model(arch), token_batch()
    model = apply_hf_lora(load_hf_model(directory), "all-linear", r=4, alpha=8, use_dora=True,
                          seed=0)
    assert torch.equal(logits_of(model, ids), logits_of(load_hf_model(directory), ids))
    randomize_lora_b(model)
    scale_magnitudes(model)
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["fan_in_fan_out"] is (arch == "gpt2")
    key = ("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" if arch == "gpt2"
           else "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    assert key in load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "adapter")
    assert (logits_of(peft_model, ids) - expected).abs().max() < 1e-5
    assert (expected - logits_of(load_hf_model(directory), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_dora_adapter_loads_in_minituner(arch, tmp_path, toy_hf_model):
    directory, ids = toy_hf_model(arch), token_batch()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch],
                             use_dora=True, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(load_hf_model(directory), config)
    scale_magnitudes(peft_model, 0.9)
    expected = logits_of(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(load_hf_model(directory), tmp_path / "peft")
    assert all(isinstance(layer, DoRALinear) for _, layer in lora_layers(model))
    assert (logits_of(model, ids) - expected).abs().max() < 1e-5
    assert (expected - logits_of(load_hf_model(directory), ids)).abs().max() > 1e-3


def test_peft_and_minituner_agree_on_gradients_of_a_conv1d_dora_layer(toy_hf_model):
    directory, ids = toy_hf_model("gpt2"), token_batch()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(load_hf_model(directory), config)
    model = apply_hf_lora(load_hf_model(directory), "c_attn", r=4, alpha=8, use_dora=True)
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            prefix = f"base_model.model.{name}"
            layer.lora_A.copy_(peft_params[f"{prefix}.lora_A.default.weight"])
            layer.lora_B.copy_(peft_params[f"{prefix}.lora_B.default.weight"])
            layer.lora_magnitude_vector.copy_(
                peft_params[f"{prefix}.lora_magnitude_vector.default.weight"])
    for net in (peft_model, model):
        net.train()
        net(input_ids=ids, use_cache=False).logits.pow(2).mean().backward()
    for name, layer in lora_layers(model):
        prefix = f"base_model.model.{name}"
        for ours, theirs in ((layer.lora_A, "lora_A.default.weight"),
                             (layer.lora_B, "lora_B.default.weight"),
                             (layer.lora_magnitude_vector,
                              "lora_magnitude_vector.default.weight")):
            reference = peft_params[f"{prefix}.{theirs}"].grad
            assert (ours.grad - reference).abs().max() <= 1e-4 * reference.abs().max() + 1e-7


def test_gpt2_conv1d_dora_merges_and_unmerges(toy_hf_model):
    directory, ids = toy_hf_model("gpt2"), token_batch()
    model = apply_hf_lora(load_hf_model(directory), "all-linear", r=4, alpha=8, use_dora=True)
    randomize_lora_b(model)
    scale_magnitudes(model)
    weights = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(model)}
    expected = logits_of(model, ids)
    merge_lora(model)
    assert (logits_of(model, ids) - expected).abs().max() < 1e-5
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        assert (layer.base.weight - weights[name]).abs().max() < 1e-5
