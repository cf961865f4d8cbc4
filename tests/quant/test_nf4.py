"""NF4 against bitsandbytes 0.50.2 on CPU: bytes, scales, dequantized values, state dicts, files."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minituner.quant.nf4 import (
    NF4_CODE,
    NF4_ZERO_INDEX,
    NF4Weight,
    code_midpoints,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
)
from minituner.quant.nf4_io import (
    QUANT_STATE_KEY,
    from_bnb_state_dict,
    load_nf4,
    save_nf4,
    to_bnb_state_dict,
)

# ----------------------------------------------------------------------------- helpers


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    """bitsandbytes' packed bytes (flat) and its quant state."""
    packed, state = bnbF.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return packed.view(-1), state


def bnb_scales(state) -> torch.Tensor:
    """bitsandbytes' fp32 block scales, decoded by bitsandbytes itself when double-quantized."""
    if state.nested:
        return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def flat_block_reference(packed, scales, shape, blocksize, dtype) -> torch.Tensor:
    """The flat-block definition: code[nibble] * scale[i // blocksize], high nibble first."""
    numel = math.prod(shape)
    nibbles = torch.stack([packed.long() >> 4, packed.long() & 15], dim=1).reshape(-1)[:numel]
    block = torch.arange(numel) // blocksize
    return (NF4_CODE[nibbles] * scales[block]).to(dtype).reshape(shape)


def assert_same_bytes(q: NF4Weight, packed, state) -> None:
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed)
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    assert q.double_quant == state.nested
    if state.nested:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.offset == state.offset.item()


def weights(shape, dtype=torch.float32, seed=0, std=0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


# ----------------------------------------------------------------------------- maps


def test_code_is_bitsandbytes_nf4_code():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1]) and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    ours = dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.numel() == 256
    assert torch.equal(ours, bnbF.create_dynamic_map(signed=signed))


# ----------------------------------------------------------------------------- byte-exact grid

GRID_SHAPES = [(64, 64), (256, 64), (64, 256), (7, 9), (3, 50), (1, 1), (5, 13, 11)]


@pytest.mark.parametrize("shape", GRID_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_and_values_match_bitsandbytes(shape, dtype, double_quant):
    w = weights(shape, dtype, seed=sum(shape))
    packed, state = bnb_quantize(w, 64, double_quant)
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert_same_bytes(q, packed, state)
    assert q.shape == tuple(shape) and q.dtype == dtype
    reference = flat_block_reference(packed, bnb_scales(state), w.shape, 64, dtype)
    assert torch.equal(q.dequantize(), reference)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_other_blocksizes_match_bitsandbytes(blocksize, double_quant):
    w = weights((96, 160), torch.float32, seed=blocksize)  # 15,360 values: partial last block
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert_same_bytes(q, packed, state)
    reference = flat_block_reference(packed, bnb_scales(state), w.shape, blocksize, w.dtype)
    assert torch.equal(dequantize_nf4(q), reference)


def test_fp16_input_matches_bitsandbytes():
    w = weights((40, 70), torch.float16, seed=3)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w)
    assert_same_bytes(q, packed, state)
    assert q.dequantize().dtype == torch.float16


def test_4096_square_matches_bitsandbytes_and_its_error():
    w = weights((4096, 4096), torch.float32, seed=0)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w)
    assert_same_bytes(q, packed, state)
    ours = q.dequantize()
    theirs = bnbF.dequantize_4bit(packed.view(-1, 1), state)  # a 64-multiple row: bnb is right
    assert torch.equal(ours, theirs)
    error = (ours - w).abs().mean().item()
    assert error == (theirs - w).abs().mean().item()
    assert 1.40e-3 < error < 1.50e-3  # about 1.457e-3 for N(0, 0.02)


def test_odd_numel_pads_with_the_code_of_zero():
    w = weights((5, 5), seed=1)  # 25 values: the last byte's low nibble is padding
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.numel() == 13
    assert int(q.packed[-1]) & 15 == NF4_ZERO_INDEX == 7 and NF4_CODE[NF4_ZERO_INDEX] == 0
    assert torch.equal(q.packed, bnb_quantize(w, 64, False)[0])


def test_non_contiguous_input_is_read_row_major():
    w = weights((64, 96), seed=2).t()
    a, b = quantize_nf4(w), quantize_nf4(w.contiguous())
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


# ----------------------------------------------------------------------------- edge blocks


def test_all_zero_blocks():
    w = weights((4, 64), seed=4).reshape(-1)
    w[64:128] = 0.0  # a full all-zero block
    w = torch.cat([w, torch.zeros(40)])  # and an all-zero partial last block
    packed, state = bnb_quantize(w, 64, False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, packed)  # zeros take the code of 0.0 everywhere
    assert q.absmax[1] == 0 and state.absmax[1] == 0
    # minituner stores the true absmax (0) for every all-zero block; bitsandbytes' partial-block
    # path clamps it to 1e-38 first. Only that scale differs, and both dequantize to zeros.
    assert q.absmax[-1] == 0 and 0 < state.absmax[-1] <= 1e-38
    assert torch.equal(q.absmax[:-1], state.absmax[:-1])
    assert torch.equal(q.dequantize()[64:128], torch.zeros(64))
    assert torch.equal(q.dequantize()[-40:], torch.zeros(40))
    reference = flat_block_reference(packed, state.absmax, w.shape, 64, w.dtype)
    assert torch.equal(q.dequantize(), reference)


def test_all_zero_tensor_with_double_quant():
    w = torch.zeros(64 * 300)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w)
    assert_same_bytes(q, packed, state)
    assert torch.equal(q.dequantize(), w)


def test_single_block_double_quant_keeps_its_scale():
    w = weights((8, 8), seed=5)  # one block: the scale equals the mean (offset)
    packed, state = bnb_quantize(w, 64, True)
    q = quantize_nf4(w)
    assert_same_bytes(q, packed, state)
    assert q.block_scales()[0] == w.abs().max()


def test_values_on_midpoints_take_the_lower_code():
    mids = code_midpoints(NF4_CODE)
    block = torch.zeros(64)
    block[0] = 1.0  # absmax 1: scaled values are the values themselves
    block[1:16] = mids
    block[16:31] = torch.nextafter(mids, torch.full_like(mids, 2.0))  # just above: upper code
    block[31:46] = torch.nextafter(mids, torch.full_like(mids, -2.0))  # just below: lower code
    w = torch.cat([block, -block]).reshape(2, 64)
    packed, state = bnb_quantize(w, 64, False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    nibbles = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1).long()
    k = torch.arange(15)
    assert torch.equal(nibbles[1:16], k)  # on the midpoint between k and k+1: k
    assert torch.equal(nibbles[16:31], k + 1)
    assert torch.equal(nibbles[31:46], k)


def test_bf16_values_next_to_midpoints_match_bitsandbytes():
    mids = code_midpoints(NF4_CODE).to(torch.bfloat16)  # bf16 cannot hold them exactly
    up = torch.nextafter(mids.float(), torch.full((15,), 2.0)).to(torch.bfloat16)
    block = torch.cat([torch.ones(1, dtype=torch.bfloat16), mids, up,
                       torch.zeros(64 - 31, dtype=torch.bfloat16)])
    w = torch.stack([block, -block])
    packed, state = bnb_quantize(w, 64, True)
    assert_same_bytes(quantize_nf4(w), packed, state)


def _reciprocal_vs_division_case():
    """(x, absmax): x * (1/absmax) lands exactly on a midpoint, x / absmax lands above it."""
    g = torch.Generator().manual_seed(0)
    mids = code_midpoints(NF4_CODE)
    for _ in range(20000):
        k = int(torch.randint(0, 15, (1,), generator=g))
        absmax = torch.rand(1, generator=g) * 0.5 + 0.5
        start = (mids[k] * absmax).view(torch.int32)
        for step in (-2, -1, 0, 1, 2):
            x = (start + step).view(torch.float32)
            if (x * (1.0 / absmax)) == mids[k] and (x / absmax) > mids[k]:
                return k, x, absmax
    raise AssertionError("no case found")


def test_partial_block_midpoint_divergence_is_bitsandbytes_fallback():
    k, x, absmax = _reciprocal_vs_division_case()
    block = torch.cat([absmax, x, torch.zeros(62)])
    full = quantize_nf4(block, double_quant=False)  # one full block
    partial = quantize_nf4(torch.cat([block, block[:10]]), double_quant=False)
    for q in (full, partial):  # minituner: reciprocal rule everywhere -> lower code k
        assert int(q.packed[0]) & 15 == k
    bnb_full, _ = bnb_quantize(block, 64, False)
    assert int(bnb_full[0]) & 15 == k  # bitsandbytes' full-block path agrees
    tail = torch.cat([torch.zeros(64), block[:2]])  # the pair alone in a partial block
    bnb_tail, _ = bnb_quantize(tail, 64, False)
    ours_tail = quantize_nf4(tail, double_quant=False)
    # bitsandbytes divides in its partial-block path: x / absmax rounds above the midpoint.
    assert int(bnb_tail[32]) & 15 == k + 1
    assert int(ours_tail.packed[32]) & 15 == k


# ----------------------------------------------------------------------------- bnb's CPU bug


def test_bitsandbytes_cpu_dequantize_bug_on_128x96():
    """bitsandbytes' bug, not minituner's: its CPU dequantize_4bit indexes blocks per row.

    96 is not a multiple of 64, so rows share blocks; bitsandbytes applies the wrong scale.
    """
    w = weights((128, 96), seed=6)
    w[::2] *= 50  # very different scales on alternate rows make the wrong scale visible
    packed, state = bnb_quantize(w, 64, False)
    reference = flat_block_reference(packed, state.absmax, w.shape, 64, w.dtype)
    theirs = bnbF.dequantize_4bit(packed.view(-1, 1), state)
    assert (theirs - reference).abs().max() > 0.1 * w.abs().max()  # bitsandbytes is wrong
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.dequantize(), reference)  # minituner follows the definition


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 200), cols=st.integers(1, 200),
    log_scale=st.floats(-4, 2), seed=st.integers(0, 2**31 - 1),
    blocksize=st.sampled_from([32, 64, 128, 256]), double_quant=st.booleans(),
    bf16=st.booleans(),
)
def test_random_shapes_and_scales_match_bitsandbytes(
    rows, cols, log_scale, seed, blocksize, double_quant, bf16
):
    dtype = torch.bfloat16 if bf16 else torch.float32
    w = weights((rows, cols), dtype, seed=seed, std=10.0**log_scale)
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert_same_bytes(q, packed, state)
    reference = flat_block_reference(packed, bnb_scales(state), w.shape, blocksize, dtype)
    assert torch.equal(q.dequantize(), reference)
    assert (q.dequantize().float() - w.float()).abs().max() <= w.float().abs().max() * 0.2


# ----------------------------------------------------------------------------- accounting


def test_bits_per_param():
    w = weights((4096, 64), seed=7)
    plain, nested = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert plain.bits_per_param() == 4.5
    assert nested.bits_per_param() == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(nested.bits_per_param(), 3) == 4.127
    assert quantize_nf4(w, blocksize=128, double_quant=False).bits_per_param() == 4.25


def test_storage_bytes_counts_every_tensor_and_constant():
    w = weights((4096, 64), seed=7)
    q = quantize_nf4(w)
    parts = [q.packed, q.absmax, q.nested_absmax, q.code, q.nested_code]
    assert q.storage_bytes() == sum(t.numel() * t.element_size() for t in parts) + 4
    assert q.packed.numel() == 4096 * 32 and q.absmax.numel() == 4096
    assert 4.15 < 8 * q.storage_bytes() / w.numel() < 4.17  # about 4.16 with the constants
    plain = quantize_nf4(w, double_quant=False)
    assert plain.storage_bytes() == 4096 * 32 + 4096 * 4 + 16 * 4


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 64.0, True])
def test_bad_blocksize_is_named(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(64), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_bad_dtype_is_named(dtype):
    with pytest.raises(ValueError, match="dtype"):
        quantize_nf4(torch.ones(64).to(dtype))


def test_empty_and_non_finite_inputs_are_rejected():
    with pytest.raises(ValueError, match="at least one element"):
        quantize_nf4(torch.ones(0))
    bad = torch.ones(100)
    bad[70] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(bad)
    with pytest.raises(ValueError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])


def test_dequantize_into_a_buffer():
    q = quantize_nf4(weights((64, 100), seed=8))
    out = torch.full((64, 100), 7.0)
    assert dequantize_nf4(q, out=out) is out
    assert torch.equal(out, q.dequantize())
    bf16 = torch.empty(64, 100, dtype=torch.bfloat16)
    assert torch.equal(q.dequantize(torch.bfloat16, out=bf16), q.dequantize().to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(q, out=torch.empty(100, 64))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_nf4(q, dtype=torch.float64)


def test_inconsistent_fields_are_rejected():
    q = quantize_nf4(weights((64, 64), seed=9))
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(packed=q.packed[:-1], absmax=q.absmax, shape=q.shape, dtype=q.dtype,
                  nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset)
    with pytest.raises(ValueError, match="double quantization"):
        NF4Weight(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype)


# ----------------------------------------------------------------------------- bnb state dicts


def bnb_linear(w: torch.Tensor, bias: torch.Tensor, blocksize: int, double_quant: bool):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4")
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes the weight


def linear4bit_from_state_dict(state_dict: dict, out_features: int, in_features: int):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                              quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in state_dict.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        data=state_dict["weight"], quantized_stats=stats, requires_grad=False, device="cpu",
        module=layer,
    )
    layer.bias = torch.nn.Parameter(state_dict["bias"], requires_grad=False)
    return layer


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_matches_linear4bit_both_ways(double_quant):
    w, bias = weights((96, 128), seed=10), weights((96,), seed=11)
    layer = bnb_linear(w, bias, 64, double_quant)
    theirs = layer.state_dict()
    ours = to_bnb_state_dict(quantize_nf4(w, double_quant=double_quant))
    assert set(ours) | {"bias"} == set(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    meta = json.loads(bytes(ours[QUANT_STATE_KEY].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [96, 128]

    loaded = from_bnb_state_dict(theirs)  # bitsandbytes -> minituner
    x = weights((5, 128), seed=12, std=1.0)
    with torch.no_grad():
        expected = layer(x)
        assert torch.allclose(F.linear(x, loaded.dequantize(), bias), expected, atol=1e-6)
        back = linear4bit_from_state_dict({**ours, "bias": bias}, 96, 128)  # and back
        assert torch.allclose(back(x), expected, atol=1e-6)


def test_state_dict_prefix_and_errors():
    q = quantize_nf4(weights((32, 64), seed=13))
    sd = to_bnb_state_dict(q, "blocks.0.fc.")
    assert "blocks.0.fc.weight" in sd and sd["blocks.0.fc.weight"].shape == (1024, 1)
    again = from_bnb_state_dict(sd, "blocks.0.fc.")
    assert torch.equal(again.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        from_bnb_state_dict(sd)  # wrong prefix
    fp4 = dict(sd)
    fp4["blocks.0.fc." + QUANT_STATE_KEY] = torch.tensor(
        list(json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float32",
                         "shape": [32, 64]}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nf4"):
        from_bnb_state_dict(fp4, "blocks.0.fc.")
    short = dict(sd)
    short["blocks.0.fc.weight.absmax"] = short["blocks.0.fc.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax"):
        from_bnb_state_dict(short, "blocks.0.fc.")


@pytest.mark.parametrize("field, value, message", [
    ("shape", 5, "'shape' must be a list of positive ints"),
    ("shape", ["a", 64], "'shape' must be a list of positive ints"),
    ("nested_offset", [1], "'nested_offset' must be a number"),
    ("nested_offset", None, "'nested_offset' must be a number"),
    ("nested_blocksize", "x", "'nested_blocksize' must be an int"),
])
def test_malformed_quant_state_fields_are_named(field, value, message):
    sd = to_bnb_state_dict(quantize_nf4(weights((32, 64), seed=13)), "fc.")
    key = "fc." + QUANT_STATE_KEY
    meta = json.loads(bytes(sd[key].tolist()).decode())
    meta[field] = value
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(sd, "fc.")


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_and_load(tmp_path, double_quant):
    q = quantize_nf4(weights((33, 65), torch.bfloat16, seed=14), double_quant=double_quant)
    path = tmp_path / "w.safetensors"
    save_nf4(path, q)
    again = load_nf4(path)
    assert again.shape == q.shape and again.dtype == q.dtype and again.offset == q.offset
    assert torch.equal(again.packed, q.packed) and torch.equal(again.absmax, q.absmax)
    assert torch.equal(again.dequantize(), q.dequantize())
    save_nf4(tmp_path / "m.safetensors", q)
    assert torch.equal(load_nf4(tmp_path / "m.safetensors").packed, q.packed)
    assert torch.equal(load_nf4(tmp_path / "m.safetensors").absmax, q.absmax)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "w.safetensors"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_nf4(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_nf4(broken)
