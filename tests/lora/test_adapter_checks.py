"""What an adapter config must say, and how far the base check goes: required keys, adapters
without a base fingerprint, and the fingerprint across dtype copies of the same base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from minituner.lora import lora_layers, wrap_minigpt_with_lora
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig


def base_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def adapted_model(seed: int = 0) -> MiniGPT:
    model = wrap_minigpt_with_lora(base_model(seed), r=4, alpha=16, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model.eval()


def edit_config(directory, edit) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("key", ["r", "lora_alpha", "peft_type"])
def test_missing_required_key_is_an_error_naming_it(tmp_path, key):
    save_adapter(adapted_model(), tmp_path)
    edit_config(tmp_path, lambda config: config.pop(key))
    with pytest.raises(ValueError, match=rf"adapter_config.json: required key '{key}' is missing"):
        load_adapter(base_model(), tmp_path)


def test_adapter_without_fingerprint_loads_with_one_warning(tmp_path):
    save_adapter(adapted_model(), tmp_path)
    edit_config(tmp_path, lambda config: config.pop("minituner"))  # as PEFT writes it
    with pytest.warns(UserWarning, match="base could not be checked") as caught:
        model = load_adapter(base_model(seed=5), tmp_path)  # another base: nothing can tell
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert len(lora_layers(model)) > 0
    assert lora_layers(model)[0][1].scaling == pytest.approx(16 / 4)


def test_adapter_with_fingerprint_loads_without_warning(tmp_path):
    save_adapter(adapted_model(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(base_model(), tmp_path)


def dtype_copy(model: MiniGPT, dtype: torch.dtype) -> MiniGPT:
    """The same base held in another dtype (fp32 -> dtype, as a bf16/fp16 checkpoint would)."""
    return model.to(dtype)


@pytest.mark.parametrize("saved_dtype,load_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
])
def test_fingerprint_survives_a_dtype_copy(tmp_path, saved_dtype, load_dtype):
    trained = adapted_model().to(saved_dtype)
    save_adapter(trained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_adapter(dtype_copy(base_model(), load_dtype), tmp_path)
    assert len(lora_layers(model)) == len(lora_layers(trained))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_another_base_is_refused_in_any_dtype(tmp_path, dtype):
    save_adapter(adapted_model(seed=0), tmp_path)
    with pytest.raises(ValueError, match="fingerprint mismatch.*--no-verify-base"):
        load_adapter(dtype_copy(base_model(seed=1), dtype), tmp_path)


@pytest.mark.parametrize("relative_change", [0.2, 0.1])
def test_a_fine_tuned_base_beyond_bf16_rounding_is_refused(tmp_path, relative_change):
    save_adapter(adapted_model(), tmp_path)
    moved = base_model()
    name, weight = next((n, p) for n, p in sorted(moved.named_parameters()) if p.ndim == 2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=generator) * weight.std()
                    * relative_change)
    with pytest.raises(ValueError, match=f"{name} differs beyond fp32/bf16/fp16 rounding"):
        load_adapter(moved.to(torch.bfloat16), tmp_path)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        load_adapter(moved.to(torch.bfloat16), tmp_path, strict=False)


def test_old_adapter_with_hash_only_is_checked_exactly(tmp_path):
    save_adapter(adapted_model(), tmp_path)
    edit_config(tmp_path, lambda c: c["minituner"]["base_fingerprint"].pop("tensor_stats"))
    load_adapter(base_model(), tmp_path)  # the same bytes: accepted
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_adapter(base_model().to(torch.bfloat16), tmp_path)  # a copy: the hash alone refuses


@pytest.mark.parametrize("stats", [
    {"algorithm": "l2-and-signed-sum-v1", "tensors": []},
    {"algorithm": "l2-and-signed-sum-v1", "tensors": {"w": {"dtype": "float32", "shape": [2]}}},
    {"algorithm": "l2-and-signed-sum-v1",
     "tensors": {"w": {"dtype": "float32", "shape": "2", "l2": 1.0, "signed_sum": 0.0}}},
])
def test_malformed_tensor_stats_are_an_error_naming_the_field(tmp_path, stats):
    save_adapter(adapted_model(), tmp_path)
    edit_config(tmp_path, lambda c: c["minituner"]["base_fingerprint"].update(tensor_stats=stats))
    with pytest.raises(ValueError, match="tensor_stats is malformed"):
        load_adapter(base_model(), tmp_path)


def test_minigpt_attach_refuses_another_base_unless_verify_base_is_off(tmp_path):
    from minituner.course.loading import attach_adapter

    save_adapter(adapted_model(seed=0), tmp_path)
    with pytest.raises(ValueError, match="another base.*--no-verify-base"):
        attach_adapter(base_model(seed=1), tmp_path)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        model, kind = attach_adapter(base_model(seed=1), tmp_path, verify_base=False)
    assert kind == "lora" and len(lora_layers(model)) == len(lora_layers(adapted_model()))
