"""A LoRA layer's forward and backward as one autograd function, for frozen bases.

``y = x W^T + b + scaling * (x A^T) B^T`` is computed as one GEMM for the base (``addmm``
with the bias) and an in-place ``addmm_`` of the rank-r update into its output: no copy of
``x`` for the adapter branch, no separate (tokens, out) tensors for the update, its scaled
copy and the sum. The backward computes, with ``gB = grad_y B`` (tokens, r)::

    grad_x = grad_y W + scaling * gB A        (one GEMM, then an in-place addmm_)
    grad_A = scaling * gB^T x                 grad_B = scaling * grad_y^T (x A^T)

and saves only what that needs: ``x`` (an activation the model holds anyway), ``x A^T``
(tokens x r) and a reference to the weight, or for an NF4 base its packed codes and scales
(it is dequantized again in the backward, as :class:`minituner.quant.qlora.QuantizedLinear` does).

The rank-r products run in the input's dtype (bf16 over a bf16 base, with A and B cast to it
for the GEMM; the GEMMs accumulate in fp32); A and B and their gradients stay in their own
dtype (fp32), so the optimizer updates fp32 master copies.
Which bases qualify is decided by :func:`fused_kind`; :class:`minituner.lora.layer.LoRALinear` falls
back to its plain forward for any other.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def is_fan_in_fan_out(base: nn.Module) -> bool:
    """True for a layer whose weight is stored (in, out), like GPT-2's Conv1D (nx in, nf out).

    Recognised by shape, without importing transformers: int ``nx`` / ``nf`` attributes and a
    2-D ``weight`` of shape (nx, nf). Re-exported by :mod:`minituner.lora.layer`.
    """
    nx, nf = getattr(base, "nx", None), getattr(base, "nf", None)
    weight = getattr(base, "weight", None)
    return (
        isinstance(nx, int) and isinstance(nf, int) and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (nx, nf)
    )


def _frozen(tensors) -> bool:
    return all(t is None or not t.requires_grad for t in tensors)


def fused_kind(base: nn.Module, x: torch.Tensor) -> str | None:
    """"linear", "conv1d" (weight stored (in, out)) or "nf4" when the fused path can run the
    base, else None: the base must be frozen, hook-free, and compute in ``x``'s dtype."""
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if hasattr(base, "dequantize_for_compute") and hasattr(base, "packed"):
        compute = getattr(base, "compute_dtype", None) or x.dtype
        return "nf4" if compute == x.dtype and _frozen([bias]) else None
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype:
        return None
    if not _frozen([weight, bias]):
        return None
    if isinstance(base, nn.Linear):
        return "linear"
    return "conv1d" if is_fan_in_fan_out(base) else None


def _base_weight(base: nn.Module, kind: str, dtype: torch.dtype, saved: tuple) -> torch.Tensor:
    """The base weight as a (out, in) or, for conv1d, (in, out) matrix in ``dtype``."""
    if kind == "nf4":
        return base.dequantize_for_compute(dtype, *saved)
    return saved[0]


def _weight_tensors(base: nn.Module, kind: str) -> tuple:
    """What the backward needs to get the weight back: the packed NF4 tensors or the weight."""
    if kind == "nf4":
        return base.packed, base.absmax, base.nested_absmax
    return base.weight, None, None


class LoRAFunction(torch.autograd.Function):
    """Inputs: x, A, B, bias, three weight tensors; constants: base, kind, scaling.

    The backward's rank-r products are laid out as (r, tokens) matrices (``B^T grad^T``,
    ``xa^T grad``): on CPU a GEMM with 8 output columns, or a transposed left operand of
    (tokens x out), runs several times slower than the same product producing 8 rows. The
    forward's ``x A^T`` keeps F.linear's layout, so its rounding is that of the plain path.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, w0, w1, w2, base, kind, scaling):
        x2d = x.reshape(-1, x.shape[-1])
        weight = _base_weight(base, kind, x.dtype, (w0, w1, w2))
        weight_t = weight if kind == "conv1d" else weight.t()
        if bias is None:
            out = torch.mm(x2d, weight_t)
        else:
            out = torch.addmm(bias.to(x.dtype), x2d, weight_t)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = torch.mm(x2d, a.t())  # (tokens, r), rounded as F.linear(x, A) rounds it
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.base, ctx.kind, ctx.scaling = base, kind, scaling
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, xa, lora_a, lora_b, w0, w1, w2)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, lora_a, lora_b, w0, w1, w2 = ctx.saved_tensors
        scaling, dtype = ctx.scaling, grad_out.dtype
        x2d = x.reshape(-1, x.shape[-1])
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_xa_t = torch.mm(b.t(), grad2d.t())  # (r, tokens) = (grad_out B)^T
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _base_weight(ctx.base, ctx.kind, dtype, (w0, w1, w2))
            grad_x = torch.mm(grad2d, weight.t() if ctx.kind == "conv1d" else weight)
            grad_x.addmm_(grad_xa_t.t(), a, alpha=scaling)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_xa_t, x2d).mul_(scaling).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(xa.t(), grad2d).mul_(scaling).t().to(lora_b.dtype).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad2d.sum(0)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None, None


def fused_lora_forward(layer, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``layer.base(x) + layer.scaling * x A^T B^T`` through :class:`LoRAFunction`."""
    base = layer.base
    w0, w1, w2 = _weight_tensors(base, kind)
    return LoRAFunction.apply(x, layer.lora_A, layer.lora_B, getattr(base, "bias", None),
                              w0, w1, w2, base, kind, layer.scaling)
