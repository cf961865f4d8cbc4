"""DoRA: the layer against a direct formula, the detached norm, merge/unmerge, rank 0, an NF4
base and PEFT-layout adapter files (Mini-GPT)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.lora import (
    DoRALinear,
    LoRALinear,
    apply_lora,
    count_lora_params,
    dora_layers,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
    wrap_minigpt_with_lora,
)
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.quant.qlora import QuantizedLinear, wrap_minigpt_qlora
from minituner.util.files import load_safetensors


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8, bias=False))


def train_like(model: nn.Module, seed: int = 1) -> None:
    """Move B and m off their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
            layer.lora_magnitude_vector.mul_(
                0.5 + torch.rand(layer.lora_magnitude_vector.shape, generator=generator))


def direct(layer: DoRALinear, x: torch.Tensor, weight: torch.Tensor | None = None,
           detach: bool = True) -> torch.Tensor:
    """m * (W + s B A) / ||W + s B A||_c applied to x, written out."""
    weight = layer.base.weight if weight is None else weight
    adapted = weight + layer.scaling * layer.lora_B @ layer.lora_A
    norm = adapted.norm(dim=1, keepdim=True)
    norm = norm.detach() if detach else norm
    return F.linear(x, layer.lora_magnitude_vector[:, None] * adapted / norm, layer.base.bias)


def minigpt(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))


def test_fresh_dora_layer_is_exactly_its_base_and_m_is_the_row_norm():
    model, x = small_model(), torch.randn(5, 16)
    expected = model(x)
    apply_lora(model, ["0", "2"], r=4, alpha=8, use_dora=True, seed=0)
    assert [type(layer) for _, layer in lora_layers(model)] == [DoRALinear, DoRALinear]
    assert torch.equal(model(x), expected)
    layer = model[0]
    assert torch.allclose(layer.lora_magnitude_vector, layer.base.weight.norm(dim=1))
    assert count_lora_params(model) == 4 * (16 + 24) + 24 + 4 * (24 + 8) + 8


def test_forward_matches_the_direct_formula_with_and_without_bias():
    model, x = small_model(), torch.randn(5, 16)
    apply_lora(model, ["0", "2"], r=4, alpha=8, use_dora=True, seed=0)
    train_like(model)
    expected = direct(model[2], F.gelu(direct(model[0], x)))
    assert (model(x) - expected).abs().max() < 1e-5
    assert (model(x) - model[2].base(F.gelu(model[0].base(x)))).abs().max() > 1e-2


def test_gradients_match_the_formula_with_a_detached_norm():
    model, x = small_model(), torch.randn(5, 16)
    apply_lora(model, ["0"], r=4, alpha=8, use_dora=True, seed=0)
    train_like(model)
    layer = model[0]
    model(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        p.grad = None
    model[2](F.gelu(direct(layer, x))).pow(2).sum().backward()
    reference = [p.grad for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    for got, want in zip(ours, reference, strict=True):
        assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))
    for p in (layer.lora_A, layer.lora_B):
        p.grad = None
    model[2](F.gelu(direct(layer, x, detach=False))).pow(2).sum().backward()
    assert (layer.lora_B.grad - ours[1]).abs().max() > 1e-4  # the norm is really detached
    assert all(p.grad is None for p in layer.base.parameters())


def test_merge_and_unmerge_round_trip_within_1e5():
    model, x = small_model(), torch.randn(5, 16)
    apply_lora(model, ["0", "2"], r=4, alpha=8, use_dora=True, seed=0)
    train_like(model)
    weights = [layer.base.weight.detach().clone() for _, layer in lora_layers(model)]
    expected = model(x).detach()
    report = merge_lora(model, probe=x)
    assert report.max_abs_diff < 1e-5
    assert (model(x) - expected).abs().max() < 1e-5
    unmerge_lora(model)
    for (_, layer), weight in zip(lora_layers(model), weights, strict=True):
        assert (layer.base.weight - weight).abs().max() < 1e-5
    assert (model(x) - expected).abs().max() < 1e-5
    merge_and_unload(model)
    assert not lora_layers(model) and (model(x) - expected).abs().max() < 1e-5


def test_delta_weight_is_the_change_of_the_effective_weight():
    model = small_model()
    apply_lora(model, ["0"], r=4, alpha=8, use_dora=True, seed=0)
    layer = model[0]
    assert layer.delta_weight().abs().max() < 1e-6
    train_like(model)
    base = layer.base.weight.detach().clone()
    delta = layer.delta_weight()
    merge_lora(model)
    assert (layer.base.weight - base - delta).abs().max() < 1e-5


def test_rank_0_trains_only_the_magnitudes_and_starts_at_the_base():
    model, x = small_model(), torch.randn(5, 16)
    expected = model(x)
    apply_lora(model, ["0", "2"], r=0, use_dora=True)
    assert torch.equal(model(x), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and p.numel()}
    assert trainable == {"0.lora_magnitude_vector", "2.lora_magnitude_vector"}
    train_like(model)
    layer = model[0]
    scaled = layer.lora_magnitude_vector[:, None] * layer.base.weight / layer.base.weight.norm(
        dim=1, keepdim=True)
    assert (model[0](x) - F.linear(x, scaled, layer.base.bias)).abs().max() < 1e-5
    merge_lora(model)
    unmerge_lora(model)
    assert (model[0].base.weight - small_model()[0].weight).abs().max() < 1e-5


def test_dora_on_an_nf4_base_is_the_nf4_base_at_step_0_and_merges():
    model, ids = minigpt(), tokens()
    wrap_minigpt_qlora(model, r=4, alpha=8, use_dora=True, seed=0)
    layers = dora_layers(model)
    assert len(layers) == 12 and all(isinstance(m.base, QuantizedLinear) for _, m in layers)
    with torch.no_grad():
        plain = [m.lora_B.clone() for _, m in layers]
    logits = model(ids)
    with torch.no_grad():
        for _, m in layers:
            m.disabled = True
        assert torch.equal(model(ids), logits)  # m = ||deq(W)||_c: the NF4 base exactly
        for _, m in layers:
            m.disabled = False
    assert all(torch.equal(b, m.lora_B) for b, (_, m) in zip(plain, layers, strict=True))
    train_like(model)
    layer = layers[0][1]
    x = torch.randn(4, 64)
    weight = layer.base.dequantized_weight(torch.float32)
    assert (layer(x) - direct(layer, x, weight=weight)).abs().max() < 1e-5
    expected = model(ids).detach()
    report = merge_lora(model, probe=ids)  # "dequantized": fp32 Linears
    assert report.target == "dequantized" and report.max_abs_diff < 1e-5
    assert (model(ids) - expected).abs().max() < 1e-5


def test_nf4_requantized_merge_moves_logits_a_little():
    model, ids = minigpt(), tokens()
    wrap_minigpt_qlora(model, r=4, alpha=8, use_dora=True, seed=0)
    train_like(model)
    expected = model(ids).detach()
    report = merge_lora(model, probe=ids, target="requantized")
    assert report.target == "requantized"  # NF4 rounds the merged weight again (about 9%)
    assert 0 < report.mean_abs_diff < 0.2 * float(expected.abs().mean())


def test_minigpt_adapter_round_trip(tmp_path):
    model, ids = minigpt(), tokens()
    wrap_minigpt_with_lora(model, r=4, alpha=8, use_dora=True, seed=0)
    train_like(model)
    expected = model(ids)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.blocks.0.mlp.fc1.lora_magnitude_vector"
    assert tuple(tensors[key].shape) == (256,)
    loaded = load_adapter(minigpt(), tmp_path / "adapter")
    assert all(isinstance(m, DoRALinear) for _, m in lora_layers(loaded))
    assert torch.equal(loaded(ids), expected)
    wrapped = wrap_minigpt_with_lora(minigpt(), r=4, alpha=8, use_dora=True, seed=5)
    assert torch.equal(load_adapter(wrapped, tmp_path / "adapter")(ids), expected)


def test_plain_lora_adapter_still_saves_use_dora_false(tmp_path):
    model = wrap_minigpt_with_lora(minigpt(), r=2)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is False
    tensors = load_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("magnitude" in key for key in tensors)


def _edit(directory, config_change=None, tensor_change=None):
    from safetensors.torch import save_file

    config_path = directory / "adapter_config.json"
    if config_change:
        config_path.write_text(json.dumps(config_change(json.loads(config_path.read_text()))))
    if tensor_change:
        weights = directory / "adapter_model.safetensors"
        save_file(tensor_change(dict(load_safetensors(weights))), str(weights))


MAGNITUDE = "base_model.model.blocks.0.attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize("change, message", [
    ({"config_change": lambda c: {**c, "use_dora": False}},
     "is a DoRA magnitude but the config has use_dora=false"),
    ({"config_change": lambda c: {**c, "use_dora": "yes"}}, "use_dora must be true or false"),
    ({"tensor_change": lambda t: {k: v for k, v in t.items() if k != MAGNITUDE}},
     "blocks.0.attn.q_proj has no lora_magnitude_vector but the config has use_dora=true"),
    ({"tensor_change": lambda t: {**t, MAGNITUDE: t[MAGNITUDE][:10].clone()}},
     "blocks.0.attn.q_proj lora_magnitude_vector (10,) does not match"),
    ({"tensor_change": lambda t: {**t, MAGNITUDE: t[MAGNITUDE][:, None].clone()}},
     "must be a 1-D float tensor"),
])
def test_bad_dora_adapter_files_are_one_line_errors(tmp_path, change, message):
    model = wrap_minigpt_with_lora(minigpt(), r=2, use_dora=True)
    save_adapter(model, tmp_path / "adapter")
    _edit(tmp_path / "adapter", **change)
    fresh = minigpt()
    with pytest.raises(ValueError) as info:
        load_adapter(fresh, tmp_path / "adapter")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not lora_layers(fresh)


def test_dora_adapter_into_plain_lora_layers_is_refused(tmp_path):
    save_adapter(wrap_minigpt_with_lora(minigpt(), r=2, use_dora=True), tmp_path / "dora")
    save_adapter(wrap_minigpt_with_lora(minigpt(), r=2), tmp_path / "lora")
    with pytest.raises(ValueError, match="is a plain LoRA layer but the adapter has use_dora=true"):
        load_adapter(wrap_minigpt_with_lora(minigpt(), r=2), tmp_path / "dora")
    with pytest.raises(ValueError, match="is a DoRA layer but the adapter has use_dora=false"):
        load_adapter(wrap_minigpt_with_lora(minigpt(), r=2, use_dora=True), tmp_path / "lora")


def test_dora_needs_a_base_with_a_readable_weight():
    class Opaque(nn.Module):
        in_features, out_features = 4, 4

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="DoRA needs a base whose weight it can read"):
        DoRALinear(Opaque(), r=2)
    assert isinstance(LoRALinear(Opaque(), r=2), LoRALinear)  # plain LoRA still wraps it
    with pytest.raises(ValueError, match="use_dora must be a bool"):
        apply_lora(small_model(), ["0"], use_dora="yes")


def test_mixed_dora_and_lora_layers_are_not_saved(tmp_path):
    model = wrap_minigpt_with_lora(minigpt(), r=2, use_dora=True)
    name, layer = lora_layers(model)[0]
    plain = LoRALinear(layer.base, r=2, config=layer.config)
    model.get_submodule(name.rsplit(".", 1)[0]).q_proj = plain
    with pytest.raises(ValueError, match="mixes DoRA and plain LoRA layers"):
        save_adapter(model, tmp_path / "adapter")


def test_dora_with_a_pissa_start_is_refused_by_name():
    from minituner.lora import apply_lora

    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="init 'pissa' cannot be used with use_dora=True"):
        apply_lora(model, ["0"], r=2, init="pissa", use_dora=True)
