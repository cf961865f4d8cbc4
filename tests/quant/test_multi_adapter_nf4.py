"""Named adapters on an NF4 base: QLoRA adapters switch and mix rows like each one alone, and a
float-base adapter is refused by name (its base fingerprint is the float model's)."""

from __future__ import annotations

import pytest
import torch

from minituner.lora import (
    forward_with_adapters,
    load_named_adapter,
    lora_layers,
    name_adapter,
    set_adapter,
    wrap_minigpt_with_lora,
)
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.quant.qlora import QuantizedLinear, wrap_minigpt_qlora


def base_model() -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(MiniGPTConfig()).eval()


def randomize_b(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4-adapters")
    for name, r in (("a", 4), ("b", 2)):
        model = wrap_minigpt_qlora(base_model(), r=r, seed=r)
        randomize_b(model, r)
        save_adapter(model, root / name)
    float_model = wrap_minigpt_with_lora(base_model(), r=4, seed=1)
    randomize_b(float_model, 1)
    save_adapter(float_model, root / "float")
    return {name: root / name for name in ("a", "b", "float")}


def nf4_alone(folder, r: int):
    return load_adapter(wrap_minigpt_qlora(base_model(), r=r), folder).eval()


@torch.no_grad()
def test_qlora_adapters_share_one_nf4_base(folders):
    model = load_adapter(wrap_minigpt_qlora(base_model(), r=4), folders["a"]).eval()
    name_adapter(model, "a")
    load_named_adapter(model, folders["b"], "b")
    assert isinstance(model.blocks[0].attn.q_proj.base, QuantizedLinear)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = {"a": nf4_alone(folders["a"], 4)(x), "b": nf4_alone(folders["b"], 2)(x)}
    for name in ("b", "a"):
        set_adapter(model, name)
        assert (model(x) - expected[name]).abs().max() <= 1e-6
    mixed = forward_with_adapters(model, x, ["b", "a"])
    assert (mixed[0] - expected["b"][0]).abs().max() <= 1e-6
    assert (mixed[1] - expected["a"][1]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="adapter 'f': .*fingerprint mismatch"):
        load_named_adapter(model, folders["float"], "f")
