"""4-bit NormalFloat (NF4) quantization, byte-compatible with bitsandbytes' stored layout.

A weight is flattened row-major and cut into blocks of ``blocksize`` values (a trailing partial
block gets its own scale). Each block is scaled by the reciprocal of its absolute maximum,
clamped to [-1, 1] and mapped to the nearest of 16 NF4 levels (a value exactly on a midpoint
takes the lower level). Two 4-bit codes share a byte, the first element in the high nibble;
an odd element count is padded with the code of 0.0 (index 7).

Double quantization stores the per-block fp32 scales as 8-bit codes: their mean (``offset``) is
subtracted and the rest is quantized in blocks of 256 with the signed 8-bit "dynamic" map
(dynamic exponent + linear fraction), each block of 256 keeping one fp32 scale.

Bytes are decided exactly as bitsandbytes 0.50.2 decides them on CPU (tests check it):
- an all-zero block stores absmax 0 (bitsandbytes' partial-block path stores 1e-38 instead;
  both dequantize to zeros);
- its 8-bit kernel picks a dynamic-map code through a 65,536-point table over [-1, 1] (the code
  nearest each table point), not the exact nearest code; minituner builds the same table, so
  the nested bytes match. A block of 256 scales that are all equal to the mean gets code 0.

The definition, written out slowly in plain torch, is :mod:`minituner.quant.reference` (tests
check these functions against it bit for bit). How the bytes are computed quickly (chunked work
on worker threads, table lookups) lives in :mod:`minituner.quant.kernels`. Serialization
(bitsandbytes state dicts, safetensors files) lives in :mod:`minituner.quant.nf4_io`, which
builds on this module (this module does not import it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minituner.quant.kernels import (  # noqa: F401  (NF4_CODE, dynamic_map, code_midpoints: public)
    NF4_CODE,
    code_midpoints,
    dequantize_flat,
    dynamic_map,
    lookup_tables,
    quantize_flat,
)

NF4_ZERO_INDEX = 7
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def check_blocksize(blocksize) -> int:
    """Validate an NF4 block size: a power of two from 32 to 4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or (
        blocksize not in VALID_BLOCKSIZES
    ):
        raise ValueError(f"blocksize must be one of {list(VALID_BLOCKSIZES)}, got {blocksize!r}")
    return blocksize


def check_dtype(dtype) -> torch.dtype:
    """Validate a weight dtype: float32, float16 or bfloat16."""
    if dtype not in SUPPORTED_DTYPES:
        names = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]
        raise ValueError(f"dtype must be one of {names}, got {dtype}")
    return dtype


def quantize_scales(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple:
    """Double quantization of fp32 block scales: (uint8 codes, fp32 nested absmax, offset)."""
    tables = lookup_tables(str(absmax.device))
    offset = absmax.mean()
    n_blocks = -(-absmax.numel() // blocksize)
    centred = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=absmax.device)
    centred[:absmax.numel()] = absmax - offset
    centred = centred.view(n_blocks, blocksize)
    nested_absmax = centred.abs().amax(dim=1)
    scaled = centred * (1.0 / nested_absmax).unsqueeze(1)
    scaled.clamp_(-1.0, 1.0)
    grid_index = ((scaled + 1) * 0.5 * 65535 + 0.5).nan_to_num_(0.0).to(torch.int32)
    codes = tables["nested_lut"][grid_index]
    codes[nested_absmax == 0] = 0
    return codes.view(-1)[:absmax.numel()].clone(), nested_absmax, float(offset)


def dequantize_scales(codes, nested_absmax, offset: float, nested_code, blocksize: int):
    """fp32 block scales from their 8-bit codes: code * nested absmax + offset."""
    values = torch.index_select(nested_code, 0, codes.to(torch.int32))
    main = (codes.numel() // blocksize) * blocksize
    values[:main].view(-1, blocksize).mul_(nested_absmax[:main // blocksize].unsqueeze(1))
    if main < codes.numel():
        values[main:].mul_(nested_absmax[-1])
    return values.add_(offset)


@dataclass(eq=False)
class NF4Weight:
    """A quantized tensor: packed 4-bit codes plus the scales and maps needed to undo it.

    Field names follow bitsandbytes' QuantState. ``absmax`` holds fp32 scales, or uint8 codes
    when double-quantized (then ``nested_absmax``, ``nested_code`` and ``offset`` are set).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    code: torch.Tensor = NF4_CODE
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        check_dtype(self.dtype)
        check_blocksize(self.blocksize)
        numel = self.numel
        if numel <= 0:
            raise ValueError(f"NF4Weight: shape {self.shape} has no elements")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"NF4Weight: packed must be {(numel + 1) // 2} uint8 values for shape "
                f"{self.shape}, got {self.packed.numel()} of {self.packed.dtype}"
            )
        if self.code.numel() != 16:
            raise ValueError(f"NF4Weight: code must hold 16 values, got {self.code.numel()}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"NF4Weight: absmax must hold {self.n_blocks} values (one per block of "
                f"{self.blocksize}), got {self.absmax.numel()}"
            )
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if self.double_quant:
            if any(part is None for part in nested) or self.absmax.dtype != torch.uint8:
                raise ValueError(
                    "NF4Weight: double quantization needs uint8 absmax codes, nested_absmax, "
                    "nested_code and offset"
                )
            want = -(-self.n_blocks // self.nested_blocksize)
            if self.nested_absmax.numel() != want or self.nested_code.numel() != 256:
                raise ValueError(
                    f"NF4Weight: nested_absmax must hold {want} values and nested_code 256"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4Weight: absmax must be float32, got {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized to 8 bits."""
        return self.nested_absmax is not None or self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        """Number of values in the original tensor."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of blocks (the last one may be partial)."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """Device of the packed codes."""
        return self.packed.device

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_scales(self.absmax, self.nested_absmax, self.offset,
                                 self.nested_code, self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
        """The float tensor this weight stands for; see :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype=dtype, out=out)

    def bits_per_param(self) -> float:
        """Storage bits per weight, leaving out per-tensor constants (maps, offset).

        4 + 32/blocksize without double quantization (4.5 at 64); with it
        4 + 8/blocksize + 32/(blocksize * 256) (4.127 at 64), as the QLoRA paper counts.
        """
        if self.double_quant:
            return 4 + 8 / self.blocksize + 32 / (self.blocksize * self.nested_blocksize)
        return 4 + 32 / self.blocksize

    def storage_bytes(self) -> int:
        """Exact bytes of every stored tensor and constant (codes, scales, maps, offset)."""
        parts = [self.packed, self.absmax, self.code]
        if self.double_quant:
            parts += [self.nested_absmax, self.nested_code]
        total = sum(t.numel() * t.element_size() for t in parts)
        return total + (4 if self.double_quant else 0)  # the fp32 offset

    def to(self, device) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        def move(t):
            return None if t is None else t.to(device)

        return NF4Weight(
            packed=move(self.packed), absmax=move(self.absmax), shape=self.shape,
            dtype=self.dtype, blocksize=self.blocksize, code=move(self.code),
            nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
            offset=self.offset, nested_blocksize=self.nested_blocksize,
        )


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor of any shape to NF4 (optionally double-quantizing the scales)."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    check_dtype(w.dtype)
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {tuple(w.shape)}")
    packed, absmax = quantize_flat(w.detach().reshape(-1), blocksize)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or infinite values; NF4 cannot represent them")
    tables = lookup_tables(str(w.device))
    fields = {"packed": packed, "shape": tuple(w.shape), "dtype": w.dtype,
              "blocksize": blocksize, "code": tables["code"]}
    if not double_quant:
        return NF4Weight(absmax=absmax, **fields)
    codes, nested_absmax, offset = quantize_scales(absmax)
    return NF4Weight(absmax=codes, nested_absmax=nested_absmax, offset=offset,
                     nested_code=tables["nested_code"].clone(), **fields)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
    """code[nibble] * absmax[block] in fp32, cast to ``dtype`` (default: the original dtype).

    ``out`` (optional) is a contiguous tensor of the weight's shape and ``dtype`` to write into.
    """
    dtype = check_dtype(q.dtype if dtype is None else dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif tuple(out.shape) != q.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {q.shape}, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    dequantize_flat(q.packed.view(-1), q.code, q.block_scales(), q.blocksize, out.view(-1))
    return out
