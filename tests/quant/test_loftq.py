"""LoftQ: the alternation lowers the error of NF4 + adapter, and its QLoRA model starts near W."""

from __future__ import annotations

import pytest
import torch

from minituner.lora import lora_layers, lora_state_dict, model_lora_config
from minituner.lora.adapters import base_fingerprint, base_tensor_stats, load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.quant.loftq import (
    apply_loftq,
    loftq_factors,
    quantize_nf4_refit,
    relative_error,
    wrap_minigpt_loftq,
)
from minituner.quant.nf4 import dequantize_nf4, quantize_nf4
from minituner.quant.nf4_io import from_bnb_state_dict, to_bnb_state_dict
from minituner.quant.qlora import QuantizedLinear, wrap_minigpt_qlora


def base_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))


def test_one_iteration_is_plain_nf4_plus_the_top_of_its_error():
    torch.manual_seed(0)
    weight = torch.randn(32, 64) * 0.02
    result = loftq_factors(weight, r=4, scaling=2.0, iters=1)
    plain = quantize_nf4(weight)
    assert torch.equal(result.weight.packed, plain.packed)
    residual = weight - dequantize_nf4(plain, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert torch.allclose(2.0 * result.lora_B @ result.lora_A, top, atol=1e-6)


def test_iterations_lower_the_error_below_plain_nf4():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    weight[:, :8] += torch.randn(64, 1) @ torch.randn(1, 8) * 0.2  # some low-rank structure
    plain = relative_error(weight, dequantize_nf4(quantize_nf4(weight), dtype=torch.float32))
    result = loftq_factors(weight, r=8, scaling=2.0, iters=5)
    assert len(result.errors) == 5
    assert result.errors[0] < plain
    assert result.errors[-1] <= result.errors[0] + 1e-6
    assert result.errors[-1] < 0.9 * plain


def test_loftq_is_deterministic_and_rank_zero_is_plain_nf4():
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    first, second = loftq_factors(weight, 2, 1.0, 3), loftq_factors(weight, 2, 1.0, 3)
    assert torch.equal(first.weight.packed, second.weight.packed)
    assert torch.equal(first.lora_A, second.lora_A)
    zero = loftq_factors(weight, 0, 0.0, 2)
    assert torch.equal(zero.weight.packed, quantize_nf4(weight).packed)


def test_loftq_model_starts_closer_to_the_float_model_than_plain_qlora():
    reference = base_model()(ids())
    plain = wrap_minigpt_qlora(base_model(), r=8).eval()
    loftq = base_model()
    errors = wrap_minigpt_loftq(loftq, r=8, iters=3)
    loftq.eval()
    assert len(errors) == 12 and all(len(e) == 3 for e in errors.values())
    assert all(isinstance(layer.base, QuantizedLinear) for _, layer in lora_layers(loftq))
    assert model_lora_config(loftq).init == "loftq"
    gap_plain = (plain(ids()) - reference).abs().mean()
    gap_loftq = (loftq(ids()) - reference).abs().mean()
    assert gap_loftq < gap_plain
    assert all(p.requires_grad == ("lora_" in n) for n, p in loftq.named_parameters())


def test_loftq_refusals_leave_the_model_untouched():
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        wrap_minigpt_loftq(base_model(), r=4, iters=0)
    model = wrap_minigpt_qlora(base_model(), r=4)
    with pytest.raises(ValueError, match="needs a float nn.Linear base"):
        apply_loftq(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        apply_loftq(base_model())


def test_saved_loftq_adapter_is_the_trained_update_for_the_original_base(tmp_path):
    original = base_model()
    model = base_model()
    wrap_minigpt_loftq(model, r=4, iters=2)
    initial = lora_state_dict(model)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.add_(0.01)
    save_adapter(model, tmp_path / "adapter", initial=initial,
                 fingerprint=base_fingerprint(original), tensor_stats=base_tensor_stats(original))
    loaded = load_adapter(base_model(), tmp_path / "adapter").eval()
    expected = base_model().eval()
    with torch.no_grad():  # W + s (B_t A_t - B_0 A_0) on the float base
        for name, layer in lora_layers(model):
            delta = layer.scaling * (layer.lora_B @ layer.lora_A
                                     - initial[f"{name}.lora_B"] @ initial[f"{name}.lora_A"])
            expected.get_submodule(name).weight.add_(delta)
    assert (loaded(ids()) - expected(ids())).abs().max() < 1e-5


def test_refit_scales_lower_the_error_and_stay_ordinary_nf4():
    torch.manual_seed(0)
    weight = torch.randn(32, 128) * 0.02
    for double_quant in (False, True):
        plain = quantize_nf4(weight, 64, double_quant)
        refit = quantize_nf4_refit(weight, 64, double_quant)
        error_plain = relative_error(weight, dequantize_nf4(plain, dtype=torch.float32))
        error_refit = relative_error(weight, dequantize_nf4(refit, dtype=torch.float32))
        assert error_refit < error_plain
        again = from_bnb_state_dict(to_bnb_state_dict(refit, "w."), "w.")
        assert torch.equal(dequantize_nf4(again), dequantize_nf4(refit))
    result = loftq_factors(weight, 4, 2.0, 3, refit_scales=True)
    assert result.errors[-1] < loftq_factors(weight, 4, 2.0, 3).errors[-1]


def test_more_starting_scales_never_raise_a_blocks_error():
    torch.manual_seed(1)
    weight = torch.randn(16, 256) * 0.05
    one = quantize_nf4_refit(weight, 64, False, starts=1)
    many = quantize_nf4_refit(weight, 64, False, starts=21)
    blocks = weight.reshape(-1, 64)

    def block_errors(q):
        return ((blocks - dequantize_nf4(q, dtype=torch.float32).reshape(-1, 64)) ** 2).sum(1)

    assert bool((block_errors(many) <= block_errors(one) + 1e-12).all())
    assert block_errors(many).sum() < block_errors(one).sum()
