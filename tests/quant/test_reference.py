"""The fast NF4 kernels against the readable reference: same bytes, scales and values."""

from __future__ import annotations

import pytest
import torch

from minituner.quant import reference
from minituner.quant.kernels import NF4_CODE, dynamic_map
from minituner.quant.nf4 import dequantize_nf4, quantize_nf4

SHAPES = [(64, 64), (7, 9), (1, 1), (3, 5, 7), (33, 65), (130, 257), (600, 700)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weights(shape, dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.02
    w.view(-1)[: min(64, w.numel() // 3)] = 0.0  # an all-zero block where there is room
    return w.to(dtype)


def test_levels_are_normal_quantiles_with_an_exact_zero():
    derived = reference.normal_quantile_levels()
    assert (derived - reference.NF4_LEVELS).abs().max() <= 1.2e-7  # 1 ulp of fp32
    assert torch.equal(reference.NF4_LEVELS, NF4_CODE)
    levels = reference.NF4_LEVELS
    assert levels[0] == -1 and levels[-1] == 1 and levels[reference.ZERO_CODE] == 0
    assert int((levels > 0).sum()) == 8 and int((levels < 0).sum()) == 7
    assert torch.equal(reference.signed_dynamic_map(), dynamic_map(signed=True))


def test_reference_rounds_midpoints_down_and_packs_high_nibble_first():
    mids = reference.midpoints()
    w = torch.cat([torch.tensor([1.0]), mids, torch.tensor([-1.0, 0.0])])  # absmax 1
    codes, absmax = reference.quantize(w, blocksize=32)
    assert absmax.tolist() == [1.0]
    assert codes[1:16].tolist() == list(range(15))  # each midpoint takes the lower level
    assert reference.pack(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x12, 0x37]
    assert reference.unpack(torch.tensor([0x12, 0x37], dtype=torch.uint8), 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_kernels_match_reference_bit_for_bit(shape, dtype, blocksize):
    w = weights(shape, dtype, seed=sum(shape) + blocksize)
    codes, absmax = reference.quantize(w, blocksize)
    fast = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(fast.absmax, absmax)
    assert torch.equal(fast.packed, reference.pack(codes))
    assert torch.equal(reference.unpack(fast.packed, w.numel()), codes)
    want = reference.dequantize(codes, absmax, blocksize, tuple(shape), dtype)
    got = dequantize_nf4(fast)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(dequantize_nf4(fast, dtype=torch.float32),
                       reference.dequantize(codes, absmax, blocksize, tuple(shape)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (33, 65), (300, 700), (1, 3)])
def test_double_quantization_matches_reference_bit_for_bit(shape, dtype):
    w = weights(shape, dtype, seed=7 + sum(shape))
    codes, absmax = reference.quantize(w, 64)
    scale_codes, nested_absmax, offset = reference.double_quantize(absmax)
    fast = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(fast.packed, reference.pack(codes))
    assert torch.equal(fast.absmax, scale_codes)
    assert torch.equal(fast.nested_absmax, nested_absmax) and fast.offset == offset
    scales = reference.dequantize_scales(scale_codes, nested_absmax, offset)
    assert torch.equal(fast.block_scales(), scales)
    want = reference.dequantize(codes, scales, 64, tuple(shape), dtype)
    assert torch.equal(dequantize_nf4(fast), want)


def test_equal_scales_get_code_zero():
    absmax = torch.full((300,), 0.5)
    codes, nested_absmax, offset = reference.double_quantize(absmax)
    assert offset == 0.5 and not codes.any() and not nested_absmax.any()
    assert torch.equal(reference.dequantize_scales(codes, nested_absmax, offset), absmax)
