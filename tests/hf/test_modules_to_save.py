"""--modules-to-save: modules trained in full beside the adapters, saved in PEFT's layout
(``base_model.model.<path>.weight``, ``modules_to_save`` in the config); PEFT loads the result
with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch, write_data

from minituner.cli import main
from minituner.hf.models import apply_hf_lora, load_hf_model
from minituner.lora.adapters import base_fingerprint, base_tensor_stats, load_adapter, save_adapter
from minituner.lora.multi import load_named_adapter, name_adapter
from minituner.lora.saved_modules import apply_modules_to_save
from minituner.util.files import load_safetensors

peft = pytest.importorskip("peft")
EMBED = {"llama": "embed_tokens", "gpt2": "wte"}


def _trained(directory, arch, names):
    model = load_hf_model(directory)
    fingerprint, stats = base_fingerprint(model), base_tensor_stats(model)
    apply_hf_lora(model, "all-linear", r=2, alpha=4, seed=0)
    paths = apply_modules_to_save(model, names)
    randomize_lora_b(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path in paths:
            weight = model.get_submodule(path).weight
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)
    return model, paths, {"fingerprint": fingerprint, "tensor_stats": stats}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("which", ["embed", "head", "both"])
def test_peft_loads_modules_to_save_with_the_same_logits(arch, which, toy_hf_model, tmp_path):
    directory, ids = toy_hf_model(arch), token_batch()
    names = {"embed": [EMBED[arch]], "head": ["lm_head"], "both": [EMBED[arch], "lm_head"]}[which]
    model, paths, base = _trained(directory, arch, names)
    assert all(model.get_submodule(p).weight.requires_grad for p in paths)
    expected = logits_of(model, ids)
    assert not torch.allclose(expected, logits_of(load_hf_model(directory), ids), atol=1e-3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory), **base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == paths
    keys = set(load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {f"base_model.model.{p}.weight" for p in paths} <= keys
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "adapter")
    assert torch.allclose(logits_of(peft_model, ids), expected, atol=1e-5)
    again = load_adapter(load_hf_model(directory), tmp_path / "adapter")
    assert torch.allclose(logits_of(again, ids), expected, atol=1e-6)


def test_tied_embedding_copy_leaves_the_head_alone(toy_hf_model):
    model, paths, _ = _trained(toy_hf_model("gpt2"), "gpt2", ["wte"])
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not model.lm_head.weight.requires_grad


def test_bad_modules_to_save_are_refused_by_name(toy_hf_model):
    model = apply_hf_lora(load_hf_model(toy_hf_model("llama")), "all-linear", r=2)
    with pytest.raises(ValueError, match="'nope' matches no module"):
        apply_modules_to_save(model, ["nope"])
    with pytest.raises(ValueError, match="LoRA target"):
        apply_modules_to_save(model, ["q_proj"])


def test_named_adapters_refuse_modules_to_save(toy_hf_model, tmp_path):
    directory = toy_hf_model("llama")
    model, _, base = _trained(directory, "llama", ["lm_head"])
    save_adapter(model, tmp_path / "adapter", **base)
    plain = apply_hf_lora(load_hf_model(directory), "all-linear", r=2, alpha=4, seed=0)
    name_adapter(plain, "first")
    with pytest.raises(ValueError, match="several named adapters .* modules_to_save"):
        load_named_adapter(plain, tmp_path / "adapter", "second")


def test_cli_modules_to_save_run_loads_in_peft(toy_hf_model, tmp_path):
    directory, ids = toy_hf_model("gpt2"), token_batch()
    data = write_data(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    assert main(["finetune", "--model", f"hf:{directory}", "--data", str(data), "--out", str(run),
                 "--steps", "3", "--batch-size", "4", "--rank", "2", "--lr", "0.01",
                 "--modules-to-save", "wte", "lm_head"]) == 0
    tuned = load_adapter(load_hf_model(directory), run / "adapter")
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), run / "adapter")
    assert torch.allclose(logits_of(peft_model, ids), logits_of(tuned, ids), atol=1e-5)
    base = load_hf_model(directory)
    assert not torch.equal(tuned.transformer.wte.weight, base.transformer.wte.weight)
