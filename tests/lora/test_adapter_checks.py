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
