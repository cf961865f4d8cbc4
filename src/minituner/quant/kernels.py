"""The NF4 kernels in plain PyTorch: code tables, chunked quantize and dequantize.

:mod:`minituner.quant.nf4` holds the format (``NF4Weight``) and the public functions; this module
holds
how the bytes are computed fast on a CPU (the same code runs on CUDA).

- Work runs in chunks of ``CHUNK`` values on worker threads so that temporaries stay in cache;
  torch releases the GIL inside its ops, so the chunks overlap.
- Quantize finds the nearest NF4 level with two table lookups on the top 16 bits of each scaled
  float (one level, or one midpoint to compare against): exact, and much faster than a search.
- Dequantize gathers both values of a byte at once from a 256-entry table of value pairs,
  then scales each block. (A 65,536-entry table of 16-bit words, four values per gather, was
  measured slower on NF4 weights: it leaves the L1/L2 cache that the 2 KiB table stays in.)
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from minituner.quant.reference import NF4_LEVELS

NF4_CODE = NF4_LEVELS  # the 16 levels, as the reference defines them
CHUNK = 1 << 18  # values per chunk (1 MiB of fp32): temporaries stay in cache


_POOL: dict = {}


def for_each_chunk(n_chunks: int, work) -> None:
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
def lookup_tables(device: str = "cpu") -> dict:
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
        "code": code,  # the standard code, one shared tensor per device
        "pairs": torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous(),
        "nested_code": nested_code,
        "nested_lut": nearest_code_table(nested_code),
    }
    return {name: t.to(device) for name, t in tables.items()}


def nearest_code_table(code: torch.Tensor, points: int = 65536) -> torch.Tensor:
    """uint8 index of the code nearest each of ``points`` evenly spaced values in [-1, 1].

    Ties go to the lower index. This is how bitsandbytes' CPU kernel picks 8-bit codes.
    """
    grid = torch.arange(points, dtype=torch.float32) / (points - 1) * 2 - 1
    right = torch.searchsorted(code, grid).clamp(1, code.numel() - 1)
    left = right - 1
    take_right = (grid - code[right]).abs() < (grid - code[left]).abs()
    return torch.where(take_right, right, left).to(torch.uint8)


def quantize_blocks(x: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor, tables) -> None:
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


def quantize_flat(flat: torch.Tensor, blocksize: int) -> tuple:
    """Packed bytes and fp32 absmax of a flat float tensor, chunk by chunk."""
    tables = lookup_tables(str(flat.device))
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
        quantize_blocks(chunk, absmax_parts[i], packed_parts[i], tables)

    for_each_chunk(len(inputs), work)
    rest = numel - n_full * blocksize
    if rest:  # a partial block: zero padding changes neither its absmax nor its codes
        tail = torch.zeros(blocksize, dtype=torch.float32, device=flat.device)
        tail[:rest] = flat[n_full * blocksize:]
        tail_bytes = torch.empty(blocksize // 2, dtype=torch.uint8, device=flat.device)
        quantize_blocks(tail.view(1, -1), absmax[n_full:], tail_bytes, tables)
        packed[n_full * blocksize // 2:] = tail_bytes[:(rest + 1) // 2]
    return packed, absmax



def standard_code(code: torch.Tensor) -> torch.Tensor:
    """The shared NF4 code tensor of ``code``'s device when ``code`` holds the standard values,
    else ``code`` itself. Compares values (a host copy off the CPU): call it once, when a
    weight is set, so that :func:`pair_table` recognises the code by identity afterwards."""
    shared = lookup_tables(str(code.device))["code"]
    if code is shared or code is NF4_CODE:
        return shared
    if code.dtype == torch.float32 and torch.equal(code.cpu(), NF4_CODE):
        return shared
    return code


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) fp32 table: byte -> (value of its high nibble, value of its low nibble).

    The standard code gets the cached table when it is the shared tensor (see
    :func:`standard_code`) or, on the CPU, equal to it; any other code gets its table built on
    its own device, so no call copies the code to the host.
    """
    tables = lookup_tables(str(code.device))
    if code is NF4_CODE or code is tables["code"] or (
            code.device.type == "cpu" and torch.equal(code, NF4_CODE)):
        return tables["pairs"]
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()


_SCRATCH = threading.local()


def _index_scratch(n: int) -> torch.Tensor:
    """This thread's int32 scratch for ``n`` gather indices (CPU), reused call after call: a
    fresh one per chunk is a 1 MiB allocation that a fixed mmap threshold maps and unmaps, page
    faults included, every time (minituner.util.files.pin_mmap_threshold)."""
    buffer = getattr(_SCRATCH, "index", None)
    if buffer is None or buffer.numel() < n:
        buffer = _SCRATCH.index = torch.empty(max(n, CHUNK // 2), dtype=torch.int32)
    return buffer[:n]


def dequantize_blocks(packed, table, scales, out, blocksize: int,
                      index: torch.Tensor | None = None) -> None:
    """Write code * scale for whole blocks of ``out``: gather both values of each byte from
    ``table`` (the pair table viewed as 256 int64), then scale; ``scales`` is (n_blocks, 1).
    ``index`` (int32, one per byte) is scratch to reuse for the gather's indices."""
    index = packed.to(torch.int32) if index is None else index.copy_(packed)
    if out.dtype == torch.float32:
        torch.index_select(table, 0, index, out=out.view(torch.int64))
        out.view(-1, blocksize).mul_(scales)
    else:  # the fp32 product, rounded once to the output dtype
        values = torch.index_select(table, 0, index).view(torch.float32).view(-1, blocksize)
        out.view(-1, blocksize).copy_(values.mul_(scales))


def dequantize_flat(packed, code, scales, blocksize: int, out) -> None:
    """Fill the flat ``out`` from packed codes and fp32 block scales, chunk by chunk."""
    numel = out.numel()
    main = (numel // blocksize) * blocksize
    pairs = pair_table(code)
    if main:
        body, body_bytes = out[:main], packed[:main // 2]
        table = pairs.view(torch.int64).view(-1)  # one 8-byte row per byte: a 1-D gather
        body_scales = scales[:main // blocksize].unsqueeze(1)
        if out.device.type != "cpu":  # one launch per op: chunks and threads only help a CPU
            dequantize_blocks(body_bytes, table, body_scales, body, blocksize)
        else:
            packed_parts = body_bytes.split(CHUNK // 2)
            out_parts = body.split(CHUNK)
            scale_parts = body_scales.split(CHUNK // blocksize)
            for_each_chunk(len(out_parts), lambda i: dequantize_blocks(
                packed_parts[i], table, scale_parts[i], out_parts[i], blocksize,
                _index_scratch(packed_parts[i].numel())))
    if main < numel:  # the partial last block
        tail = pairs[packed[main // 2:].long()].view(-1)[:numel - main]
        out[main:] = (tail * scales[-1]).to(out.dtype)
