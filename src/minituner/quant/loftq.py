"""LoftQ (Li et al., 2023): start QLoRA's NF4 base and adapter so that together they are close to W.

Plain QLoRA stores ``Q = NF4(W)`` and starts the adapter at zero, so the model begins with the
whole quantization error ``W - deq(Q)``. LoftQ alternates, ``iters`` times, starting from
``B A = 0``:

    Q      = NF4(W - s * B A)                  # quantize what the adapter does not hold
    (A, B) = rank-r SVD of (W - deq(Q)) / s    # the adapter takes the best rank-r part of the rest

so ``deq(Q) + s * B A`` approaches W (``s`` = alpha / r: the factors are divided by it, as
PiSSA's, so ``s * B A`` is the SVD part; PEFT's ``loftq_init`` leaves the scaling out). One
iteration is PEFT's default (``loftq_iter=1``): Q is then plain NF4(W) and the adapter holds the
top of its error. The layer's error after each iteration, ``||W - deq(Q) - s B A|| / ||W||``, is
returned by :func:`loftq_factors` (``errors``) so a run can report how it converged.

``refit_scales=True`` (minituner's addition, measured in ``benchmarks/loftq.py``) also chooses
each block's scale instead of taking its absmax: with the codes fixed, the scale that minimises
the block's squared error is ``<w, c> / <c, c>``; with the scale fixed, the best codes are the
nearest levels of ``w / scale``; :func:`quantize_nf4_refit` alternates the two (each step can
only lower the error) from several starting scales (0.6 to 1 times the absmax), keeps each
block's best, and picks the codes last for the scale as double quantization stores it. The
result is an ordinary NF4 weight (its "absmax" is that scale, double quantized as usual), so
bitsandbytes and the dequantize path read it unchanged.

Everything is deterministic: NF4 is exact integer work and the SVD is the full one in fp32.
Like PiSSA the start changes the base: the adapter is saved converted to a plain LoRA adapter on
the original float base (:func:`minituner.lora.init.converted_pair`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from minituner.lora import (
    MINIGPT_TARGETS,
    apply_lora,
    lora_layers,
    model_lora_config,
    set_model_lora_config,
)
from minituner.lora.base import is_fan_in_fan_out
from minituner.lora.init import svd_factors
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.kernels import NF4_CODE, code_midpoints, lookup_tables
from minituner.quant.nf4 import (
    NESTED_BLOCKSIZE,
    NF4Weight,
    check_blocksize,
    check_dtype,
    dequantize_nf4,
    dequantize_scales,
    quantize_nf4,
    quantize_scales,
)
from minituner.quant.qlora import (
    DequantBuffer,
    QuantizedLinear,
    QuantizedOrigin,
    _linear_targets,
    parse_quant_scheme,
)
from minituner.quant.reference import pack

__all__ = ["DEFAULT_LOFTQ_ITERS", "LoftQResult", "apply_loftq", "check_iters", "loftq_factors",
           "quantize_nf4_refit", "relative_error", "wrap_minigpt_loftq"]

DEFAULT_LOFTQ_ITERS = 1  # PEFT's loftq_iter default


def check_iters(iters) -> int:
    """Validate a LoftQ iteration count: an int >= 1."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ iters must be an int >= 1, got {iters!r}")
    return iters


@dataclass
class LoftQResult:
    """One layer's LoftQ start: the NF4 weight, the adapter and the error after each iteration."""

    weight: NF4Weight
    lora_A: torch.Tensor  # (r, in), fp32
    lora_B: torch.Tensor  # (out, r), fp32
    errors: list  # ||W - deq(Q) - s B A|| / ||W|| after each iteration


def relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """||weight - approximation|| / ||weight|| (Frobenius, fp32)."""
    weight = weight.float()
    return float((weight - approximation.float()).norm() / weight.norm().clamp_min(1e-30))


@torch.no_grad()
def quantize_nf4_refit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                       rounds: int = 4, starts: int = 21) -> NF4Weight:
    """NF4 with least-squares block scales: from each of ``starts`` scales between 0.6 and 1
    times the block's absmax, codes and scale alternate ``rounds`` times; each block keeps the
    start with the lowest error, and its codes are chosen last for the scale as stored (after
    double quantization). An ordinary :class:`NF4Weight` (see the module docstring)."""
    check_dtype(w.dtype)
    check_blocksize(blocksize)
    flat = w.detach().float().reshape(-1)
    blocks = torch.zeros(-(-flat.numel() // blocksize) * blocksize)
    blocks[:flat.numel()] = flat
    blocks = blocks.view(-1, blocksize)
    levels = NF4_CODE.float()
    midpoints = code_midpoints(levels)

    def nearest(scale: torch.Tensor) -> torch.Tensor:
        scaled = (blocks / scale.clamp(min=1e-38).unsqueeze(1)).clamp(-1.0, 1.0)
        return torch.bucketize(scaled, midpoints, right=False)

    def block_error(scale: torch.Tensor) -> torch.Tensor:
        return ((blocks - levels[nearest(scale)] * scale.unsqueeze(1)) ** 2).sum(dim=1)

    absmax = blocks.abs().amax(dim=1)
    best_scale, best_error = absmax, block_error(absmax)
    for start in torch.linspace(0.6, 1.0, max(1, starts)):
        scale = absmax * start
        for _ in range(rounds):
            chosen = levels[nearest(scale)]
            energy = (chosen * chosen).sum(dim=1)
            fitted = (blocks * chosen).sum(dim=1) / energy.clamp(min=1e-30)
            scale = torch.where(energy > 0, fitted, scale)
        error = block_error(scale)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    tables = lookup_tables(str(w.device))
    fields = {"shape": tuple(w.shape), "dtype": w.dtype, "blocksize": blocksize,
              "code": tables["code"]}
    if not double_quant:
        codes = nearest(best_scale).reshape(-1)[:flat.numel()]
        return NF4Weight(packed=pack(codes), absmax=best_scale, **fields)
    scale_codes, nested_absmax, offset = quantize_scales(best_scale)
    nested_code = tables["nested_code"].clone()
    stored = dequantize_scales(scale_codes, nested_absmax, offset, nested_code, NESTED_BLOCKSIZE)
    codes = nearest(stored).reshape(-1)[:flat.numel()]
    return NF4Weight(packed=pack(codes), absmax=scale_codes, nested_absmax=nested_absmax,
                     offset=offset, nested_code=nested_code, **fields)


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, r: int, scaling: float, iters: int = DEFAULT_LOFTQ_ITERS,
                  blocksize: int = 64, double_quant: bool = True,
                  refit_scales: bool = False) -> LoftQResult:
    """LoftQ's alternation on one (out, in) float weight (see the module docstring)."""
    check_iters(iters)
    quantize = quantize_nf4_refit if refit_scales else quantize_nf4
    target = weight.detach().float()
    lora_a = torch.zeros(r, target.shape[1])
    lora_b = torch.zeros(target.shape[0], r)
    errors = []
    for _ in range(iters):
        q = quantize((target - scaling * lora_b @ lora_a).to(weight.dtype), blocksize,
                     double_quant)
        dequantized = dequantize_nf4(q, dtype=torch.float32)
        if r > 0:
            lora_a, lora_b = svd_factors(target - dequantized, r, scaling)
        errors.append(relative_error(target, dequantized + scaling * lora_b @ lora_a))
    return LoftQResult(q, lora_a, lora_b, errors)


def apply_loftq(model: nn.Module, iters: int = DEFAULT_LOFTQ_ITERS, blocksize: int = 64,
                double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                refit_scales: bool = False) -> dict:
    """LoftQ on a model whose LoRA layers wrap float ``nn.Linear`` bases: each base becomes a
    QuantizedLinear of LoftQ's Q and each adapter its start; returns {layer path: errors}.

    Every layer is checked before the first changes; the bases share one DequantBuffer and the
    model's LoRAConfig records ``init="loftq"``.
    """
    check_iters(iters)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to initialise with LoftQ")
    for name, layer in layers:
        if not isinstance(layer.base, nn.Linear) or is_fan_in_fan_out(layer.base):
            raise ValueError(f"{name}: init 'loftq' needs a float nn.Linear base, got "
                             f"{type(layer.base).__name__}")
        if layer.r > 0 and layer.scaling <= 0:
            raise ValueError(f"{name}: init 'loftq' needs a positive scaling")
    buffer, errors = DequantBuffer(), {}
    for name, layer in layers:
        result = loftq_factors(layer.base.weight, layer.r, layer.scaling, iters, blocksize,
                               double_quant, refit_scales)
        with torch.no_grad():
            layer.lora_A.copy_(result.lora_A)
            layer.lora_B.copy_(result.lora_B)
        bias = None if layer.base.bias is None else layer.base.bias.detach()
        layer.base = QuantizedLinear(result.weight, bias, compute_dtype, buffer,
                                     QuantizedOrigin())
        errors[name] = result.errors
    config = model_lora_config(model)
    if config is not None:
        set_model_lora_config(model, replace(config, init="loftq"))
    return errors


def wrap_minigpt_loftq(model: nn.Module, r: int = 8, alpha: float = 16.0,
                       iters: int = DEFAULT_LOFTQ_ITERS,
                       quant_scheme: str = DEFAULT_QUANT_SCHEME, target_modules=MINIGPT_TARGETS,
                       compute_dtype: torch.dtype | None = None, refit_scales: bool = False,
                       **lora_kw) -> dict:
    """QLoRA with LoftQ's start on Mini-GPT (or any model with nn.Linear targets): the model is
    wrapped in place; returns {layer path: error per iteration}. ``lora_kw`` go to
    :func:`minituner.lora.apply_lora` (dropout, use_rslora, ...)."""
    blocksize, double_quant = parse_quant_scheme(quant_scheme)
    check_iters(iters)
    _linear_targets(model, target_modules, compute_dtype)
    apply_lora(model, target_modules, r=r, alpha=alpha, **lora_kw)
    return apply_loftq(model, iters, blocksize, double_quant, compute_dtype, refit_scales)
