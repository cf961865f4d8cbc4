"""A LoRA layer's forward and backward as one autograd function, for frozen bases.

``y = x W^T + b + scaling * (x A^T) B^T`` is computed as one GEMM for the base (the base's
:meth:`~minituner.lora.base.FrozenBase.frozen_forward`) and an in-place ``addmm_`` of the
rank-r update into its output: no copy of ``x`` for the adapter branch, no separate
(tokens, out) tensors for the update, its scaled copy and the sum. The backward computes, with
``gB = grad_y B`` (tokens, r)::

    grad_x = grad_y W + scaling * gB A        (the base's input gradient, then an addmm_)
    grad_A = scaling * gB^T x                 grad_B = scaling * grad_y^T (x A^T)

and saves only what that needs: ``x`` (an activation the model holds anyway), ``x A^T``
(tokens x r) and the base's ``fused_state``: a reference to a float weight, or for an NF4 base
its packed codes and scales (the base rebuilds its weight in the backward).

The rank-r products run in the input's dtype (bf16 over a bf16 base, with A and B cast to it
for the GEMM; the GEMMs accumulate in fp32); A and B and their gradients stay in their own
dtype (fp32), so the optimizer updates fp32 master copies.
Which bases qualify is decided by :func:`fused_base` and the base's ``fused_state``;
:class:`minituner.lora.layer.LoRALinear` falls back to its plain forward for any other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minituner.lora.base import DenseBase, FrozenBase, frozen_base


def fused_base(base: nn.Module) -> FrozenBase | None:
    """The base's :class:`FrozenBase` when the fused path may run it (no hooks), else None."""
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    return frozen_base(base)


def fused_kind(base: nn.Module, x: torch.Tensor) -> str | None:
    """"linear", "conv1d" (weight stored (in, out)) or "protocol" (a base implementing
    FrozenBase itself) when the fused path runs ``base`` on ``x``, else None."""
    frozen = fused_base(base)
    if frozen is None or frozen.fused_state(x) is None:
        return None
    if not isinstance(frozen, DenseBase):
        return "protocol"
    return "conv1d" if frozen.fan_in_fan_out else "linear"


class LoRAFunction(torch.autograd.Function):
    """Inputs: x, A, B, then the base's state tensors; constants: the base and scaling.

    The backward's rank-r products are laid out as (r, tokens) matrices (``B^T grad^T``,
    ``xa^T grad``): on CPU a GEMM with 8 output columns, or a transposed left operand of
    (tokens x out), runs several times slower than the same product producing 8 rows. The
    forward's ``x A^T`` keeps F.linear's layout, so its rounding is that of the plain path.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, *state):
        x2d = x.reshape(-1, x.shape[-1])
        out = base.frozen_forward(x2d, state)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        xa = torch.mm(x2d, a.t())  # (tokens, r), rounded as F.linear(x, A) rounds it
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.base, ctx.scaling = base, scaling
        ctx.save_for_backward(x, xa, lora_a, lora_b, *state)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, lora_a, lora_b, *state = ctx.saved_tensors
        scaling, dtype = ctx.scaling, grad_out.dtype
        x2d = x.reshape(-1, x.shape[-1])
        grad2d = grad_out.reshape(-1, grad_out.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_xa_t = torch.mm(b.t(), grad2d.t())  # (r, tokens) = (grad_out B)^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.base.frozen_input_grad(grad2d, tuple(state))
            grad_x.addmm_(grad_xa_t.t(), a, alpha=scaling)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_xa_t, x2d).mul_(scaling).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(xa.t(), grad2d).mul_(scaling).t().to(lora_b.dtype).contiguous()
        return (grad_x, grad_a, grad_b, None, None) + (None,) * len(state)


def fused_lora_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer.base(x) + layer.scaling * x A^T B^T`` through :class:`LoRAFunction`, or None
    when the base cannot run fused on ``x`` (hooks, another dtype, trainable base tensors)."""
    base = fused_base(layer.base)
    state = None if base is None else base.fused_state(x)
    if state is None:
        return None
    return LoRAFunction.apply(x, layer.lora_A, layer.lora_B, base, layer.scaling, *state)
