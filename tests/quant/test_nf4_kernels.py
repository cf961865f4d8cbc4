"""The NF4 kernels against a direct, slow formula: code[nibble] * scale[block]."""

from __future__ import annotations

import threading

import pytest
import torch

from minituner.quant import kernels as nf4_kernels
from minituner.quant.kernels import (
    NF4_CODE,
    dequantize_flat,
    for_each_chunk,
    lookup_tables,
    pair_table,
    standard_code,
)


def reference(packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, blocksize: int,
              numel: int) -> torch.Tensor:
    """Element by element: high nibble first, then low; each block times its scale."""
    nibbles = torch.stack([packed.long() >> 4, packed.long() & 15], dim=1).view(-1)[:numel]
    block = torch.arange(numel) // blocksize
    return code[nibbles] * scales[block]


@pytest.mark.parametrize("numel", [64, 4096 + 7, 3 * 1024 + 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_flat_matches_the_formula_across_chunks(monkeypatch, numel, dtype):
    monkeypatch.setattr(nf4_kernels, "CHUNK", 1024)  # several chunks and worker threads
    generator = torch.Generator().manual_seed(numel)
    blocksize = 64
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=generator)
    scales = torch.rand(-(-numel // blocksize), generator=generator) + 0.1
    out = torch.empty(numel, dtype=dtype)
    dequantize_flat(packed, NF4_CODE, scales, blocksize, out)
    want = reference(packed, NF4_CODE, scales, blocksize, numel).to(dtype)
    assert torch.equal(out, want)


def test_a_custom_code_gets_its_own_pair_table():
    code = torch.linspace(-1, 1, 16)
    table = pair_table(code)
    assert table.shape == (256, 2)
    assert torch.equal(table[0x3A], torch.stack([code[3], code[10]]))
    assert pair_table(NF4_CODE) is pair_table(NF4_CODE.clone())  # the standard one is cached
    packed = torch.tensor([0x3A, 0xF0], dtype=torch.uint8)
    out = torch.empty(4)
    dequantize_flat(packed, code, torch.tensor([2.0]), 32, out)  # only a partial block
    assert torch.equal(out, 2.0 * torch.stack([code[3], code[10], code[15], code[0]]))


def test_pair_table_never_copies_a_device_code_to_the_host(monkeypatch):
    shared = lookup_tables("meta")["code"]
    assert standard_code(NF4_CODE) is NF4_CODE and standard_code(NF4_CODE.clone()) is NF4_CODE
    custom = torch.linspace(-1, 1, 16)
    assert standard_code(custom) is custom
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: pytest.fail("host copy"))
    assert pair_table(shared) is lookup_tables("meta")["pairs"]
    table = pair_table(custom.to("meta"))  # an unknown code: its own table, on its device
    assert table.device.type == "meta" and table.shape == (256, 2)
    monkeypatch.setattr(nf4_kernels, "CHUNK", 1024)
    monkeypatch.setattr(nf4_kernels, "for_each_chunk", lambda *a: pytest.fail("chunked"))
    out = torch.empty(4096 + 32, device="meta")  # off the CPU: one chunk, no worker threads
    dequantize_flat(torch.empty(2064, dtype=torch.uint8, device="meta"), shared,
                    torch.empty(65, device="meta"), 64, out)


def test_for_each_chunk_runs_every_index_once():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, lock = [], threading.Lock()

        def work(i: int) -> None:
            with lock:
                seen.append(i)

        for_each_chunk(37, work)
        assert sorted(seen) == list(range(37))
    finally:
        torch.set_num_threads(previous)
