"""Quiz checks on NF4 quantization and the memory planner (q-28-05 to q-28-09).

Plain functions, registered by :mod:`minituner.quiz.check` (which this module does not import)
from :data:`MEMORY_CHECKS`. Also here: :class:`CheckError`, raised by any check whose
observations contradict each other, and the option order of the questions these checks answer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributions import Normal

from minituner.quant.nf4 import NF4_CODE, quantize_nf4
from minituner.training.memory import (
    GB,
    base_weight_bytes,
    full_ft_state_bytes,
    plan_memory,
    qlora_paper_settings,
)

# Option order of the choice questions; tests compare these with the YAML's option text.
Q07_BITS = ((4.0, 4.0), (4.5, 4.127), (4.5, 4.0), (5.0, 4.5))
Q08_BYTES_PER_PARAM_AND_7B_GB = ((2, 14), (4, 28), (12, 84), (16, 112))
Q09_GB_16BIT_AND_NF4 = ((130, 65), (130, 34), (65, 17), (260, 130))


class CheckError(RuntimeError):
    """A check whose observations contradict each other (a library bug, not a quiz bug)."""


def nf4_code_facts(results: Path) -> set:
    """q-28-06: read NF4_CODE and compare it with normalised N(0, 1) quantiles."""
    code = torch.as_tensor(NF4_CODE, dtype=torch.float64).flatten()
    gaps = code[1:] - code[:-1]
    quantiles = _normal_quantile_levels()
    true_options = set()
    if code.numel() == 16:
        true_options.add(1)
    if (code == 0).any().item():
        true_options.add(2)
    if (gaps.max() - gaps.min()).item() < 1e-6:
        true_options.add(3)
    if code.numel() == 16 and (code - quantiles).abs().max().item() < 1e-5:
        true_options.add(4)
    if (code > 0).sum().item() == (code < 0).sum().item():
        true_options.add(5)
    return true_options


def _normal_quantile_levels():
    """16 levels: 8 positive and 7 negative N(0, 1) quantiles, a zero, scaled to [-1, 1]."""
    normal, offset = Normal(0.0, 1.0), 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return levels / levels.abs().max()


def nf4_bits_per_weight(results: Path) -> set:
    """q-28-07: bits per weight of NF4 tensors without and with double quantization."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 4096, generator=generator) * 0.02
    bits = []
    for double_quant in (False, True):
        quantized = quantize_nf4(weight, blocksize=64, double_quant=double_quant)
        stored = quantized.storage_bytes() * 8 / weight.numel()  # per-tensor constants included
        if abs(stored - quantized.bits_per_param()) > 0.01:
            raise CheckError(f"stored {stored:.4f} bits/weight vs bits_per_param() "
                             f"{quantized.bits_per_param():.4f}")
        bits.append(quantized.bits_per_param())
    plain, double = bits
    return {
        number
        for number, (want_plain, want_double) in enumerate(Q07_BITS, 1)
        if abs(plain - want_plain) < 0.01 and abs(double - want_double) < 0.01
    }


def full_ft_bytes_per_param(results: Path) -> set:
    """q-28-08: ask the memory planner for mixed-precision full fine-tuning of LLaMA-7B."""
    plan = plan_memory("llama-7b", "full-mixed", batch=1, seq=1)
    n_params = plan.assumptions["n_params"]
    state = plan.buckets["weights"] + plan.buckets["gradients"] + plan.buckets["optimizer"]
    per_param = round(state / n_params)  # buffers and step counters are a rounding error
    if full_ft_state_bytes(n_params) != per_param * n_params:
        raise CheckError("plan_memory and full_ft_state_bytes disagree on bytes per parameter")
    seven_b = full_ft_state_bytes(7_000_000_000) / GB
    return {
        number
        for number, (bytes_per_param, gigabytes) in enumerate(Q08_BYTES_PER_PARAM_AND_7B_GB, 1)
        if per_param == bytes_per_param and round(seven_b) == gigabytes
    }


def _base_gigabytes_65b() -> tuple:
    n_params = 65_000_000_000
    return base_weight_bytes(n_params, "fp16") / GB, base_weight_bytes(n_params, "nf4-dq") / GB


def qlora_65b_base_sizes(results: Path) -> set:
    """q-28-09: a 65B base in 16-bit and in NF4 with double quantization, per the planner."""
    sixteen_bit, nf4 = _base_gigabytes_65b()
    return {
        number
        for number, (want_16bit, want_nf4) in enumerate(Q09_GB_16BIT_AND_NF4, 1)
        if round(sixteen_bit) == want_16bit and abs(nf4 - want_nf4) < 1.0
    }


def qlora_65b_fits_48gb(results: Path) -> dict:
    """q-28-05: plan QLoRA-paper training of LLaMA-65B with a 16-bit base and with NF4."""
    settings = qlora_paper_settings()
    method = settings.pop("method")
    qlora = plan_memory("llama-65b", method, **settings)
    settings = {k: v for k, v in settings.items() if k not in ("quant", "blocksize")}
    lora = plan_memory("llama-65b", "lora", **settings)
    sixteen_bit, nf4 = _base_gigabytes_65b()
    return {
        "fp16_base_fits_48gb": sixteen_bit < 48,
        "nf4_base_fits_48gb": nf4 < 48,
        "lora_16bit_base_plan_fits_48gb": lora.total_bytes / GB < 48,
        "qlora_nf4_plan_fits_48gb": qlora.total_bytes / GB < 48,
        "lora_16bit_base_plan_gb": lora.total_bytes / GB,
        "qlora_nf4_plan_gb": qlora.total_bytes / GB,
    }


MEMORY_CHECKS = (
    nf4_code_facts,
    nf4_bits_per_weight,
    full_ft_bytes_per_param,
    qlora_65b_base_sizes,
    qlora_65b_fits_48gb,
)
