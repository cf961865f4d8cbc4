"""The fused LoRA autograd function: same outputs and gradients as the plain path, less saved."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from minituner.lora import LoRALinear, apply_lora, lora_layers
from minituner.lora.fused import fused_kind
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.quant.qlora import DequantBuffer, QuantizedLinear
from minituner.training.loop import build_optimizer


class FanInFanOut(nn.Module):
    """A GPT-2 Conv1D look-alike: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nx, self.nf = nx, nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(
            *x.shape[:-1], self.nf)


def make_base(kind: str, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv1d":
        return FanInFanOut(48, 40)
    layer = nn.Linear(48, 40, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    if kind == "nf4":
        return QuantizedLinear.from_linear(layer, buffer=DequantBuffer())
    return layer


def lora_layer(kind: str, bias: bool = True, dtype=torch.float32, **kwargs) -> LoRALinear:
    base = make_base(kind, bias)
    if kind != "nf4":
        base = base.to(dtype)
    layer = LoRALinear(base, r=4, alpha=8.0, init="kaiming",
                       generator=torch.Generator().manual_seed(1), **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return layer


def outputs_and_grads(layer: LoRALinear, fused: bool, x: torch.Tensor, grad: torch.Tensor):
    layer = copy.deepcopy(layer)
    layer.fused = fused
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True),
                                       ("nf4", True), ("nf4", False)])
def test_fused_matches_plain_path_fp32(kind, bias):
    layer = lora_layer(kind, bias)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(4))
    fused = outputs_and_grads(layer, True, x, grad)
    plain = outputs_and_grads(layer, False, x, grad)
    assert fused_kind(layer.base, x) == ("protocol" if kind == "nf4" else kind)
    for got, want in zip(fused, plain, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_fused_bf16_close_to_fp32_and_keeps_fp32_adapters(kind):
    layer = lora_layer(kind, dtype=torch.bfloat16)
    if kind == "nf4":
        layer.base.compute_dtype = torch.bfloat16
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))
    out, grad_x, grad_a, grad_b = outputs_and_grads(layer, True, x.bfloat16(), grad.bfloat16())
    ref = copy.deepcopy(layer).float()
    if kind == "nf4":
        ref.base.compute_dtype = torch.float32
    ref_out, ref_x, ref_a, ref_b = outputs_and_grads(ref, False, x, grad)
    assert out.dtype == grad_x.dtype == torch.bfloat16
    assert grad_a.dtype == grad_b.dtype == torch.float32  # the fp32 master adapters
    for got, want in ((out, ref_out), (grad_x, ref_x), (grad_a, ref_a), (grad_b, ref_b)):
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= 0.02 * scale


def saved_for_backward(layer, x: torch.Tensor) -> list:
    """Every tensor autograd saves during ``layer(x)`` (then runs the backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    return saved


def test_fused_saves_input_itself_and_no_output_sized_tensor():
    layer = lora_layer("linear")
    x = torch.randn(6, 48, requires_grad=True)
    saved = saved_for_backward(layer, x)
    float_saved = [t for t in saved if t.is_floating_point() and t.dim() == 2]
    assert any(t.data_ptr() == x.data_ptr() for t in float_saved)  # x itself, not a copy
    assert not any(tuple(t.shape) == (6, 40) for t in float_saved)  # nothing (tokens, out)
    small = [t for t in float_saved if t.data_ptr() != x.data_ptr()
             and t.data_ptr() not in (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(),
                                      layer.base.weight.data_ptr())]
    assert [tuple(t.shape) for t in small] == [(6, 4)]  # (tokens, r) = x A^T


def test_nf4_base_saves_packed_weight_only():
    layer = lora_layer("nf4")
    x = torch.randn(6, 48, requires_grad=True)
    saved = saved_for_backward(layer, x)
    assert not any(tuple(t.shape) == (40, 48) for t in saved)  # no dequantized weight
    assert any(t.dtype == torch.uint8 and t.numel() == 40 * 48 // 2 for t in saved)
    assert x.grad is not None


def test_no_input_gradient_when_input_needs_none():
    layer = lora_layer("nf4")
    dequantize, calls = layer.base.dequantize_for_compute, []

    def counted(*args):
        calls.append(args)
        return dequantize(*args)

    layer.base.dequantize_for_compute = counted
    out = layer(torch.randn(6, 48))
    assert len(calls) == 1  # the forward's
    out.sum().backward()
    assert len(calls) == 1  # the backward needs no base weight: x wants no gradient
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    layer(torch.randn(6, 48, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # the counter does see a backward that needs the weight


def test_falls_back_when_dropout_trains_the_base_or_hooks():
    x = torch.randn(6, 48)
    dropping = lora_layer("linear", dropout=0.5).train()
    assert dropping._dropout_active()
    dropping.eval()
    assert not dropping._dropout_active()
    trainable = LoRALinear(make_base("linear"), r=4, freeze_base=False)
    assert fused_kind(trainable.base, x) is None
    trainable(x).sum().backward()
    assert trainable.base.weight.grad is not None  # the plain path trains the base
    hooked = lora_layer("linear")
    hooked.base.register_forward_hook(lambda module, inputs, out: out * 2)
    assert fused_kind(hooked.base, x) is None
    assert fused_kind(lora_layer("linear").base, x.double()) is None  # dtype mismatch


def test_fused_minigpt_training_matches_plain():
    torch.manual_seed(0)
    model = apply_lora(MiniGPT(MiniGPTConfig()), ["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "fc1", "fc2"], r=4, seed=0)
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(7))
    losses = {}
    for fused in (True, False):
        run = copy.deepcopy(model)
        for _, layer in lora_layers(run):
            layer.fused = fused
        optimizer = build_optimizer(run, lr=1e-2)
        losses[fused] = []
        for _ in range(4):
            _, loss = run(data[:, :-1], data[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[fused].append(float(loss))
    assert losses[True][0] == pytest.approx(losses[False][0], abs=1e-6)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_in_place_merge_equals_weight_plus_delta_and_unmerge_restores(kind):
    layer = lora_layer(kind)
    original = layer.base.weight.detach().clone()
    expected = original + layer.delta_weight().detach()
    layer.merge()
    assert torch.allclose(layer.base.weight, expected, atol=1e-7)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, original, atol=1e-7)


def test_merge_into_bf16_base_uses_the_rounded_delta():
    layer = lora_layer("linear", dtype=torch.bfloat16)
    original = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, original + layer.delta_weight().detach().bfloat16())
