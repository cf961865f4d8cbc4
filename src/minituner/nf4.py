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

The work runs in chunks of ``CHUNK`` values on worker threads so that temporaries stay in cache.
The nearest NF4 level is found with two table lookups on the top 16 bits of each scaled float
(one level, or one midpoint to compare against): exact, and much faster than a binary search.
Dequantization gathers both values of a byte at once from a 256-entry table, then scales.
Serialization (bitsandbytes state dicts, safetensors files) lives in :mod:`minituner.nf4_io`.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_INDEX = 7
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256
CHUNK = 1 << 18  # values per chunk (1 MiB of fp32): temporaries stay in cache


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


_POOL: dict = {}


def _for_each_chunk(n_chunks: int, work) -> None:
    """Call ``work(i)`` for every chunk index on ``torch.get_num_threads()`` worker threads.

    torch releases the GIL inside ops, so chunks overlap; on two shared cores this measured
    faster than one thread issuing whole-tensor ops (fewer thread hand-offs per byte, and the
    chunk temporaries stay in cache). Chunks write disjoint slices of preallocated outputs.
    """
    n_workers = min(torch.get_num_threads(), n_chunks)
    if n_workers <= 1:
        for i in range(n_chunks):
            work(i)
        return
    pool = _POOL.get(n_workers)
    if pool is None:
        pool = _POOL[n_workers] = ThreadPoolExecutor(n_workers, thread_name_prefix="nf4")
    queue, lock = iter(range(n_chunks)), threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            work(i)

    for future in [pool.submit(drain) for _ in range(n_workers)]:
        future.result()


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The decision boundaries between adjacent levels of a sorted code (fp32 means)."""
    return (code[:-1] + code[1:]) / 2


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit "dynamic" map: 7 decades of linear fractions, plus 0 and 1 (256 fp32).

    Decade ``i`` (scale 10^(i-6)) holds the centres of ``2^i`` equal steps of [0.1, 1] (twice
    as many when unsigned), mirrored for the signed map; 0 and 1.0 complete the 256 values.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        steps = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (decade - 6)) * centres
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _lookup_tables(device: str = "cpu") -> dict:
    """Tables for quantizing (by top-16-bit prefix) and dequantizing (by byte), per device."""
    code, mids = NF4_CODE, code_midpoints(NF4_CODE)
    prefix = torch.arange(65536, dtype=torch.int64) << 16
    ends = [prefix, prefix | 0xFFFF]  # the smallest and largest bit pattern with that prefix
    ends = [torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32) for b in ends]
    low = torch.minimum(*ends).nan_to_num(0.0).clamp(-1.0, 1.0)
    high = torch.maximum(*ends).nan_to_num(0.0).clamp(-1.0, 1.0)
    low_level, high_level = torch.bucketize(low, mids), torch.bucketize(high, mids)
    if int((high_level - low_level).max()) > 1:
        raise RuntimeError("NF4 prefix table: a 16-bit prefix spans more than one midpoint")
    threshold = torch.where(
        high_level > low_level, mids[low_level.clamp(max=14)], torch.tensor(math.inf)
    )
    byte = torch.arange(256)
    nested_code = dynamic_map(signed=True)
    tables = {
        "level": low_level.to(torch.uint8),  # level of the prefix's low end
        "threshold": threshold,  # values above it take the next level (+inf: never)
        "pairs": torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous(),
        "nested_code": nested_code,
        "nested_lut": _nearest_code_table(nested_code),
    }
    return {name: t.to(device) for name, t in tables.items()}


def _nearest_code_table(code: torch.Tensor, points: int = 65536) -> torch.Tensor:
    """uint8 index of the code nearest each of ``points`` evenly spaced values in [-1, 1].

    Ties go to the lower index. This is how bitsandbytes' CPU kernel picks 8-bit codes.
    """
    grid = torch.arange(points, dtype=torch.float32) / (points - 1) * 2 - 1
    right = torch.searchsorted(code, grid).clamp(1, code.numel() - 1)
    left = right - 1
    take_right = (grid - code[right]).abs() < (grid - code[left]).abs()
    return torch.where(take_right, right, left).to(torch.uint8)


def _quantize_blocks(x: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor, tables) -> None:
    """Quantize full blocks ``x`` (n_blocks, blocksize) fp32; write absmax and packed bytes."""
    low, high = torch.aminmax(x, dim=1)
    torch.maximum(high, low.neg_(), out=absmax)
    absmax.abs_()  # turn a -0.0 maximum into +0.0
    scaled = x * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    scaled.clamp_(-1.0, 1.0)
    prefix = scaled.view(torch.int32) >> 16
    prefix = prefix.bitwise_and_(0xFFFF).view(-1)
    levels = torch.index_select(tables["level"], 0, prefix)
    levels.add_(scaled.view(-1) > torch.index_select(tables["threshold"], 0, prefix))
    torch.add(levels[1::2], levels[0::2], alpha=16, out=packed)


def _quantize_flat(flat: torch.Tensor, blocksize: int) -> tuple:
    """Packed bytes and fp32 absmax of a flat float tensor, chunk by chunk."""
    tables = _lookup_tables(str(flat.device))
    numel = flat.numel()
    n_full = numel // blocksize
    n_blocks = -(-numel // blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    main = n_full * blocksize
    inputs = flat[:main].split(CHUNK)
    absmax_parts = absmax[:n_full].split(CHUNK // blocksize)
    packed_parts = packed[:main // 2].split(CHUNK // 2)

    def work(i: int) -> None:
        chunk = inputs[i].to(torch.float32).view(-1, blocksize)
        _quantize_blocks(chunk, absmax_parts[i], packed_parts[i], tables)

    _for_each_chunk(len(inputs), work)
    rest = numel - n_full * blocksize
    if rest:  # a partial block: zero padding changes neither its absmax nor its codes
        tail = torch.zeros(blocksize, dtype=torch.float32, device=flat.device)
        tail[:rest] = flat[n_full * blocksize:]
        tail_bytes = torch.empty(blocksize // 2, dtype=torch.uint8, device=flat.device)
        _quantize_blocks(tail.view(1, -1), absmax[n_full:], tail_bytes, tables)
        packed[n_full * blocksize // 2:] = tail_bytes[:(rest + 1) // 2]
    return packed, absmax


def quantize_scales(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple:
    """Double quantization of fp32 block scales: (uint8 codes, fp32 nested absmax, offset)."""
    tables = _lookup_tables(str(absmax.device))
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

    def to_bnb_state_dict(self, prefix: str = "") -> dict:
        """State-dict entries as ``bnb.nn.Linear4bit`` writes them (``<prefix>weight...``)."""
        from minituner.nf4_io import to_bnb_state_dict

        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, state_dict, prefix: str = "") -> NF4Weight:
        """Read the entries of a ``bnb.nn.Linear4bit`` state dict (nf4 only)."""
        from minituner.nf4_io import from_bnb_state_dict

        return from_bnb_state_dict(state_dict, prefix)

    def save(self, path) -> None:
        """Atomically write this weight to a safetensors file (bitsandbytes key layout)."""
        from minituner.nf4_io import save_nf4

        save_nf4(path, self)

    @classmethod
    def load(cls, path) -> NF4Weight:
        """Read a weight written by :meth:`save` (or a bitsandbytes-layout safetensors file)."""
        from minituner.nf4_io import load_nf4

        return load_nf4(path)


def save_nf4(path, q: NF4Weight):
    """Atomically write ``q`` to a safetensors file (see :mod:`minituner.nf4_io`)."""
    from minituner.nf4_io import save_nf4 as save

    return save(path, q)


def load_nf4(path) -> NF4Weight:
    """Read a weight written by :func:`save_nf4` (see :mod:`minituner.nf4_io`)."""
    from minituner.nf4_io import load_nf4 as load

    return load(path)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor of any shape to NF4 (optionally double-quantizing the scales)."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    check_dtype(w.dtype)
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"w must have at least one element, got shape {tuple(w.shape)}")
    packed, absmax = _quantize_flat(w.detach().reshape(-1), blocksize)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("w contains NaN or infinite values; NF4 cannot represent them")
    tables = _lookup_tables(str(w.device))
    fields = {"packed": packed, "shape": tuple(w.shape), "dtype": w.dtype,
              "blocksize": blocksize, "code": NF4_CODE.to(w.device)}
    if not double_quant:
        return NF4Weight(absmax=absmax, **fields)
    codes, nested_absmax, offset = quantize_scales(absmax)
    return NF4Weight(absmax=codes, nested_absmax=nested_absmax, offset=offset,
                     nested_code=tables["nested_code"].clone(), **fields)


def _pair_table(q: NF4Weight) -> torch.Tensor:
    """(256, 2) fp32 table: byte -> (value of its high nibble, value of its low nibble)."""
    if q.code is NF4_CODE or torch.equal(q.code.cpu(), NF4_CODE):
        return _lookup_tables(str(q.device))["pairs"]
    byte = torch.arange(256, device=q.device)
    return torch.stack([q.code[byte >> 4], q.code[byte & 15]], dim=1).contiguous()


def _dequantize_chunk(packed, pairs64, scales, out, blocksize: int) -> None:
    """Write code * scale for whole blocks: gather both values of each byte, then scale."""
    index = packed.to(torch.int32)
    if out.dtype == torch.float32:
        torch.index_select(pairs64, 0, index, out=out.view(torch.int64))
        out.view(-1, blocksize).mul_(scales)
    else:  # the fp32 product, rounded once to the output dtype
        values = torch.index_select(pairs64, 0, index).view(torch.float32).view(-1, blocksize)
        out.view(-1, blocksize).copy_(values.mul_(scales))


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
    flat, pairs, scales = out.view(-1), _pair_table(q), q.block_scales()
    packed, bs = q.packed.view(-1), q.blocksize
    main = (q.numel // bs) * bs

    pairs64 = pairs.view(torch.int64).view(-1)  # one 8-byte row per byte: a 1-D gather
    if 0 < main <= CHUNK:  # one chunk: no splitting, no worker threads
        _dequantize_chunk(packed[:main // 2], pairs64, scales[:main // bs].unsqueeze(1),
                          flat[:main], bs)
    elif main:
        packed_parts = packed[:main // 2].split(CHUNK // 2)
        out_parts = flat[:main].split(CHUNK)
        scale_parts = scales[:main // bs].unsqueeze(1).split(CHUNK // bs)
        _for_each_chunk(len(out_parts), lambda i: _dequantize_chunk(
            packed_parts[i], pairs64, scale_parts[i], out_parts[i], bs))
    if main < q.numel:  # the partial last block
        tail = pairs[packed[main // 2:].long()].view(-1)[:q.numel - main]
        flat[main:] = (tail * scales[-1]).to(dtype)
    return out
