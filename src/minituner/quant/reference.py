"""NF4 as a definition: short, slow, plain torch. The fast kernels must match it bit for bit.

NormalFloat-4 (QLoRA, Dettmers et al. 2023), in the layout bitsandbytes stores:

1. Levels: 16 values at quantiles of N(0, 1), normalised so the largest is 1, with an exact
   zero: 8 positive levels, 7 negative, 0 (:func:`normal_quantile_levels`). The stored fp32
   values (:data:`NF4_LEVELS`, bitsandbytes' table) agree with that derivation to 1 ulp.
2. Blocks: the tensor is flattened row-major and cut into blocks of ``blocksize`` values; a
   trailing partial block gets its own scale. Each block's scale is its absolute maximum (fp32).
3. Rounding: each value times ``1 / absmax`` (clamped to [-1, 1]) takes the nearest level; a
   value exactly on a midpoint between two levels takes the lower one.
4. Packing: two 4-bit codes per byte, the first element in the high nibble; an odd count is
   padded with the code of 0.0 (index 7).
5. Double quantization: the fp32 scales minus their mean are quantized in blocks of 256 to 8
   bits with the signed "dynamic" map (:func:`signed_dynamic_map`); bitsandbytes' CPU kernel
   picks the map entry nearest the point of a 65,536-point grid over [-1, 1] that the value
   rounds to, and so does this reference.

Dequantizing is ``level[code] * absmax[block]`` in fp32, cast to the wanted dtype. The fast
versions (:mod:`minituner.quant.kernels`, behind :func:`minituner.quant.nf4.quantize_nf4`)
compute the same bytes with table lookups and threads.
"""

from __future__ import annotations

import torch

NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
ZERO_CODE = 7  # the index of 0.0 in NF4_LEVELS
QUANTILE_OFFSET = 0.9677083  # the outermost probability QLoRA takes quantiles at
GRID_POINTS = 65536  # bitsandbytes' lookup grid for 8-bit codes


def normal_quantile_levels(offset: float = QUANTILE_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels derived from N(0, 1) quantiles (fp32, to within 1 ulp of NF4_LEVELS).

    Positive side: quantiles at 8 evenly spaced probabilities from ``offset`` towards 0.5;
    negative side: 7 of them; plus an exact zero; all divided by the largest.
    """
    def quantiles(n: int) -> torch.Tensor:
        probs = offset + (0.5 - offset) * torch.arange(n, dtype=torch.float64) / n
        return torch.special.ndtri(probs)

    values = torch.cat([quantiles(8), torch.zeros(1, dtype=torch.float64), -quantiles(7)])
    values = values.sort().values
    return (values / values.max()).float()


def midpoints(levels: torch.Tensor = NF4_LEVELS) -> torch.Tensor:
    """The 15 decision boundaries between adjacent levels (fp32)."""
    return (levels[:-1] + levels[1:]) / 2


def quantize(w: torch.Tensor, blocksize: int = 64) -> tuple:
    """(codes uint8 (numel,), absmax fp32 (n_blocks,)) of ``w`` flattened row-major."""
    flat = w.detach().reshape(-1).float()
    n_blocks = -(-flat.numel() // blocksize)
    padded = torch.zeros(n_blocks * blocksize)
    padded[:flat.numel()] = flat  # zeros change neither a block's absmax nor its codes
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1.0, 1.0)
    codes = torch.bucketize(scaled, midpoints(), right=False)  # on a midpoint: the lower level
    return codes.reshape(-1)[:flat.numel()].to(torch.uint8), absmax


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, first in the high nibble; an odd count is padded with ZERO_CODE."""
    codes = codes.to(torch.int64)
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([ZERO_CODE])])
    return (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` codes of packed bytes (uint8)."""
    high, low = packed.to(torch.int64) // 16, packed.to(torch.int64) % 16
    return torch.stack([high, low], dim=1).reshape(-1)[:numel].to(torch.uint8)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: tuple,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """level[code] * absmax[block] in fp32, cast to ``dtype``."""
    block = torch.arange(codes.numel()) // blocksize
    values = NF4_LEVELS[codes.to(torch.int64)] * absmax[block]
    return values.to(dtype).reshape(shape)


def signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map, sorted (256 fp32 values).

    Decade ``i`` (i = 0..6, scale 10^(i-6)) holds the centres of 2^i equal steps of [0.1, 1],
    each with both signs; 0 and 1 complete it, and the rest of the 256 entries are zeros.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        edges = torch.linspace(0.1, 1.0, 2**decade + 1, dtype=torch.float32)
        centres = (10.0 ** (decade - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += centres.tolist() + (-centres).tolist()
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple:
    """(uint8 codes, fp32 nested absmax per block of ``blocksize``, fp32 offset) of the scales."""
    dynamic = signed_dynamic_map()
    offset = absmax.mean()
    n_blocks = -(-absmax.numel() // blocksize)
    centred = torch.zeros(n_blocks * blocksize)
    centred[:absmax.numel()] = absmax - offset
    blocks = centred.view(n_blocks, blocksize)
    nested_absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / nested_absmax).unsqueeze(1)).clamp(-1.0, 1.0)
    grid_index = ((scaled + 1) * 0.5 * (GRID_POINTS - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
    grid_value = grid_index.float() / (GRID_POINTS - 1) * 2 - 1
    distance = (grid_value.unsqueeze(-1) - dynamic).abs()
    codes = distance.argmin(dim=-1)  # the first (lower) entry on a tie
    codes[nested_absmax == 0] = 0  # a block of scales all equal to the mean
    return codes.reshape(-1)[:absmax.numel()].to(torch.uint8), nested_absmax, float(offset)


def dequantize_scales(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float,
                      blocksize: int = 256) -> torch.Tensor:
    """fp32 scales back from their 8-bit codes: map[code] * nested absmax + offset."""
    block = torch.arange(codes.numel()) // blocksize
    return signed_dynamic_map()[codes.to(torch.int64)] * nested_absmax[block] + offset
