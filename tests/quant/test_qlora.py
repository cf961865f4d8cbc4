"""QuantizedLinear, QLoRA on Mini-GPT, merging into NF4 bases and the bitsandbytes layout."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.lora import (
    LoRALinear,
    load_lora_state_dict,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    wrap_minigpt_with_lora,
)
from minituner.models.minigpt import MiniGPT
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4
from minituner.quant.qlora import (
    QUANT_SCHEMES,
    DequantBuffer,
    QuantizedLinear,
    logit_difference,
    merge_quantized_lora,
    parse_quant_scheme,
    quantization_summary,
    quantize_model,
    wrap_minigpt_qlora,
)
from minituner.training.loop import build_optimizer


def linear(in_features=96, out_features=80, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer


def tokens(batch=8, seq=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- QuantizedLinear


def test_quantized_linear_has_no_trainable_parameters():
    layer = QuantizedLinear.from_linear(linear())
    assert list(layer.parameters()) == []
    assert (layer.in_features, layer.out_features) == (96, 80)
    assert layer.packed.dtype == torch.uint8 and layer.absmax.dtype == torch.uint8
    assert layer.storage_bytes() == layer.nf4.storage_bytes() + 80 * 4  # NF4 weight + fp32 bias
    assert layer.storage_bytes() < 96 * 80 * 4 / 4  # well under a quarter of fp32 here


def test_forward_is_linear_with_the_dequantized_weight():
    source = linear()
    layer = QuantizedLinear.from_linear(source)
    x = torch.randn(4, 7, 96)
    expected = F.linear(x, layer.dequantized_weight(), source.bias)
    assert torch.equal(layer(x), expected)
    q = quantize_nf4(source.weight.detach())
    assert torch.equal(layer.dequantized_weight(), q.dequantize())


def test_input_gradient_matches_a_float_reference():
    layer = QuantizedLinear.from_linear(linear())
    reference = nn.Linear(96, 80)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight())
        reference.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, 80)
    layer(x).backward(grad)
    reference(x_ref).backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_backward_saves_packed_weight_not_the_dequantized_matrix():
    layer = QuantizedLinear.from_linear(linear(in_features=128, out_features=64))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert ((128 * 64 // 2,), torch.uint8) in saved  # the packed codes
    assert ((128,), torch.uint8) in saved  # 8-bit block scales
    assert not any(shape == (64, 128) for shape, _ in saved)  # no dequantized weight
    assert not any(dtype.is_floating_point and len(shape) == 2 for shape, dtype in saved)
    assert sum(torch.Size(s).numel() for s, d in saved if d.is_floating_point) < 64 * 128 / 16
    assert x.grad is not None and x.grad.shape == x.shape


def test_bf16_compute_and_shared_buffer():
    buffer = DequantBuffer()
    source = linear(seed=1)
    layer = QuantizedLinear.from_linear(source, compute_dtype=torch.bfloat16, buffer=buffer)
    x = torch.randn(6, 96)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.dequantized_weight(torch.bfloat16),
                        source.bias.bfloat16()).float()
    assert torch.equal(out, expected)
    assert buffer.nbytes() == 96 * 80 * 2  # one bf16 (80, 96) scratch matrix
    other = QuantizedLinear.from_linear(linear(seed=2), compute_dtype=torch.bfloat16,
                                        buffer=buffer)
    other(x)
    assert buffer.nbytes() == 96 * 80 * 2  # reused, not grown


def test_half_keeps_codes_and_scales():
    layer = QuantizedLinear.from_linear(linear(bias=False), double_quant=False)
    before = layer.dequantized_weight()
    layer.half()
    assert layer.absmax.dtype == torch.float32 and torch.equal(layer.dequantized_weight(), before)


def test_state_dict_round_trip_uses_bitsandbytes_keys():
    layer = QuantizedLinear.from_linear(linear(seed=3))
    state = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
            "bias"} == set(state)
    other = QuantizedLinear.from_linear(linear(seed=4))
    other.load_state_dict(state)
    assert torch.equal(other.dequantized_weight(), layer.dequantized_weight())
    assert torch.equal(other.bias, layer.bias)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k != "weight.absmax"})


def test_the_standard_code_is_recognised_once_when_the_weight_is_set(monkeypatch):
    layer = QuantizedLinear.from_linear(linear(seed=3))
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # an equal, distinct code
    other = QuantizedLinear.from_linear(linear(seed=4))
    other.load_state_dict(state)
    assert other.code is NF4_CODE and layer.code is NF4_CODE  # the shared standard tensor
    custom = quantize_nf4(linear(seed=5).weight.detach())
    custom.code = torch.linspace(-1, 1, 16)
    odd = QuantizedLinear(custom)
    assert odd.code is custom.code
    assert torch.equal(odd.dequantized_weight(), dequantize_nf4(custom))
    compared = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real_equal(a, b))
    x = torch.randn(2, 96, requires_grad=True)
    other(x).sum().backward()
    assert compared == []  # no per-call comparison of the code on the standard path


def test_from_bnb_state_dict():
    source = linear(in_features=128, out_features=64, seed=5)
    layer4 = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32,
                               compress_statistics=True, quant_type="nf4")
    layer4.weight = bnb.nn.Params4bit(source.weight.detach().clone(), requires_grad=False,
                                      compress_statistics=True, quant_type="nf4")
    layer4.bias = nn.Parameter(source.bias.detach().clone(), requires_grad=False)
    layer4 = layer4.to("cpu")
    ours = QuantizedLinear.from_bnb_state_dict(layer4.state_dict())
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), layer4(x), atol=1e-6)
    assert torch.equal(ours.dequantized_weight(), QuantizedLinear.from_linear(source)
                       .dequantized_weight())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, layer4.state_dict()[key]), key


def test_quantize_model_replaces_targets_only():
    model = MiniGPT()
    quantize_model(model, ["q_proj", "fc1"], double_quant=False)
    assert isinstance(model.blocks[1].attn.q_proj, QuantizedLinear)
    assert isinstance(model.blocks[1].mlp.fc1, QuantizedLinear)
    assert isinstance(model.blocks[1].attn.k_proj, nn.Linear)
    assert model.blocks[0].mlp.fc1.dequant_buffer is model.blocks[1].attn.q_proj.dequant_buffer
    with pytest.raises(ValueError, match="only nn.Linear"):
        quantize_model(model, ["q_proj"])
    with pytest.raises(ValueError, match="matches no Linear"):
        quantize_model(MiniGPT(), ["nope"])


# ----------------------------------------------------------------------------- QLoRA


def test_wrap_minigpt_qlora_structure_and_trainable_tensors():
    model = wrap_minigpt_qlora(MiniGPT(), r=8, alpha=16.0, seed=0)
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, QuantizedLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2304 * 8
    summary = quantization_summary(model)
    assert summary["double_quant"] is True and summary["quant_scheme"] == DEFAULT_QUANT_SCHEME
    assert summary["blocksize"] == 64 and summary["quantized_modules"] == 12
    _, loss = model(tokens()[:, :-1], tokens()[:, 1:])
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(ValueError, match="nf4_per_group_64") as info:
        wrap_minigpt_qlora(MiniGPT(), quant_scheme="int4_per_tensor")
    assert "int4_per_tensor" in str(info.value)
    assert parse_quant_scheme("nf4_per_group_64") == (64, True)
    assert all(parse_quant_scheme(name)[0] in (32, 64, 128, 256) for name in QUANT_SCHEMES)


def test_bad_lora_arguments_leave_the_model_untouched():
    model = MiniGPT()
    with pytest.raises(ValueError, match="dropout"):
        wrap_minigpt_qlora(model, dropout=1.5)
    assert isinstance(model.blocks[0].attn.q_proj, nn.Linear)


def test_qlora_trains_minigpt():
    torch.manual_seed(0)
    model = wrap_minigpt_qlora(MiniGPT(), r=8, seed=0)
    batch = tokens(16, 32, seed=1)
    optimizer = build_optimizer(model, lr=2e-2)
    losses = []
    for _ in range(8):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.fixture(scope="module")
def trained_pair():
    """A QLoRA Mini-GPT after a few training steps, and the float-base LoRA with its adapter."""
    torch.manual_seed(0)
    base = MiniGPT()
    qlora = wrap_minigpt_qlora(copy.deepcopy(base), seed=0)
    batch = tokens(16, 32, seed=2)
    optimizer = build_optimizer(qlora, lr=5e-3)
    for _ in range(4):
        _, loss = qlora(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lora = wrap_minigpt_with_lora(copy.deepcopy(base), seed=0)
    load_lora_state_dict(lora, lora_state_dict(qlora))
    return qlora, lora, batch[:, :-1]


def test_nf4_base_moves_logits_a_little(trained_pair):
    qlora, lora, probe = trained_pair
    diff = logit_difference(qlora, lora, probe)
    assert 0 < diff.relative < 0.1  # small but nonzero (the course quotes 1-3% when pretrained)
    assert diff.max_abs >= diff.mean_abs > 0
    same = logit_difference(lora, lora, probe)
    assert same.max_abs == 0 and same.relative == 0


def test_merge_dequantized_matches_unmerged_model(trained_pair):
    qlora, probe = copy.deepcopy(trained_pair[0]), trained_pair[2]
    with torch.no_grad():
        before = qlora(probe)
    report = merge_lora(qlora, probe=probe)  # delegates to merge_quantized_lora
    assert report.target == "dequantized" and report.n_layers == 12
    assert report.max_abs_diff < 1e-4
    base = qlora.blocks[0].attn.q_proj.base
    assert type(base) is nn.Linear and not base.weight.requires_grad
    merge_and_unload(qlora)
    assert type(qlora.blocks[0].attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(qlora(probe), before, atol=1e-4)


def test_merge_requantized_reports_its_drift(trained_pair):
    qlora, probe = copy.deepcopy(trained_pair[0]), trained_pair[2]
    with torch.no_grad():
        before = qlora(probe)
    report = merge_quantized_lora(qlora, target="requantized", probe=probe)
    assert isinstance(qlora.blocks[0].attn.q_proj.base, QuantizedLinear)
    with torch.no_grad():
        after = qlora(probe)
    drift = (after - before).abs()
    assert report.max_abs_diff == pytest.approx(drift.max().item())
    assert report.mean_abs_diff == pytest.approx(drift.mean().item())
    assert report.mean_abs_diff > 0  # fresh NF4 rounding of W + BA: outputs do change
    with pytest.raises(ValueError, match="already merged"):
        merge_quantized_lora(qlora, probe=probe)
    with pytest.raises(ValueError, match="target"):
        merge_quantized_lora(wrap_minigpt_qlora(MiniGPT()), target="float16")
