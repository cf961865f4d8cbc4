"""What a LoRA layer needs from the frozen layer it wraps, declared once.

:class:`FrozenBase` is the interface: the base's geometry, its forward without autograd (the
fused LoRA function saves what its backward needs itself), the input gradient, and how to fold
an update ``scaling * B @ A`` into it. ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored
(in, out)) get lora's own implementation, :class:`DenseBase`; any other layer, such as the NF4
``QuantizedLinear`` of :mod:`minituner.quant.qlora`, implements the protocol itself, so this
package never imports quantization code. :func:`frozen_base` picks the implementation.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["DenseBase", "FrozenBase", "frozen_base", "is_fan_in_fan_out"]


@runtime_checkable
class FrozenBase(Protocol):
    """A frozen Linear-like layer a LoRA layer can wrap, fuse with and merge into.

    ``state`` below is whatever :meth:`fused_state` returned: the tensors autograd keeps for the
    backward (a reference to the weight, or the packed codes and scales of a quantized weight).
    """

    in_features: int
    out_features: int
    source_fan_in_fan_out: bool  # built from a layer stored (in, out): PEFT's fan_in_fan_out
    merge_targets: tuple  # the targets merge_lora accepts for this base; the first is the default

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh (out, in) copy of the weight in ``dtype``."""

    def fused_state(self, x: torch.Tensor) -> tuple | None:
        """Tensors the backward needs to rebuild the weight for input ``x``; None: cannot fuse."""

    def frozen_forward(self, x2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """``x W^T + b`` as a new (tokens, out) tensor in ``x2d``'s dtype, outside autograd."""

    def frozen_input_grad(self, grad2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """``grad W``: a new (tokens, in) gradient of the base's output with respect to x."""

    def merged_with(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    target: str, row_scale: torch.Tensor | None = None) -> nn.Module:
        """A frozen module computing this base with ``scaling * B @ A`` added to its weight,
        then each output row times ``row_scale`` (out,) when given (DoRA's magnitude)."""


def is_fan_in_fan_out(base: nn.Module) -> bool:
    """True for a layer whose weight is stored (in, out), like GPT-2's Conv1D (nx in, nf out).

    Recognised by shape, without importing transformers: int ``nx`` / ``nf`` attributes and a
    2-D ``weight`` of shape (nx, nf).
    """
    nx, nf = getattr(base, "nx", None), getattr(base, "nf", None)
    weight = getattr(base, "weight", None)
    return (
        isinstance(nx, int) and isinstance(nf, int) and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (nx, nf)
    )


class DenseBase:
    """:class:`FrozenBase` for a float ``nn.Linear`` (weight (out, in)) or Conv1D ((in, out))."""

    merge_targets = ("float",)

    def __init__(self, module: nn.Module):
        self.module = module
        self.fan_in_fan_out = is_fan_in_fan_out(module)
        self.source_fan_in_fan_out = self.fan_in_fan_out
        if self.fan_in_fan_out:
            self.in_features, self.out_features = module.nx, module.nf
        else:
            self.in_features, self.out_features = module.in_features, module.out_features

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A fresh (out, in) copy of the weight in ``dtype``."""
        weight = self.module.weight.detach()
        return (weight.t() if self.fan_in_fan_out else weight).to(dtype, copy=True)

    def fused_state(self, x: torch.Tensor) -> tuple | None:
        """(weight,) when the weight is in ``x``'s dtype and nothing of the base trains."""
        weight, bias = self.module.weight, self.module.bias
        if weight.dtype != x.dtype or weight.requires_grad:
            return None
        if bias is not None and bias.requires_grad:
            return None
        return (weight,)

    def frozen_forward(self, x2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """One GEMM, with the bias as its addend."""
        (weight,) = state
        weight_t = weight if self.fan_in_fan_out else weight.t()
        bias = self.module.bias
        if bias is None:
            return torch.mm(x2d, weight_t)
        return torch.addmm(bias.to(x2d.dtype), x2d, weight_t)

    def frozen_input_grad(self, grad2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """``grad W`` (``grad W^T`` for a weight stored (in, out))."""
        (weight,) = state
        return torch.mm(grad2d, weight.t() if self.fan_in_fan_out else weight)

    @torch.no_grad()
    def shift(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              sign: float) -> None:
        """W += sign * scaling * B @ A in place (one GEMM when dtype and device agree)."""
        weight = self.module.weight
        if not weight.is_floating_point():
            raise ValueError(
                f"cannot merge into a {type(self.module).__name__} base: it has no float weight"
            )
        if weight.dtype == lora_a.dtype and weight.device == lora_a.device and lora_a.numel():
            left, right = (lora_a.t(), lora_b.t()) if self.fan_in_fan_out else (lora_b, lora_a)
            weight.addmm_(left, right, alpha=sign * scaling)  # no (out, in) temporary
            return
        delta = scaling * (lora_b @ lora_a)
        delta = delta.t() if self.fan_in_fan_out else delta
        weight.add_((sign * delta).to(device=weight.device, dtype=weight.dtype))

    @torch.no_grad()
    def scale_rows(self, row_scale: torch.Tensor) -> None:
        """Multiply each output row of the weight (a column of a Conv1D's) by ``row_scale``."""
        weight = self.module.weight
        scale = row_scale.to(device=weight.device, dtype=weight.dtype)
        weight.mul_(scale[None, :] if self.fan_in_fan_out else scale[:, None])

    def merged_with(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                    target: str, row_scale: torch.Tensor | None = None) -> nn.Module:
        """The same module, its weight shifted by the update (and rows scaled) in place."""
        self.shift(lora_a, lora_b, scaling, +1.0)
        if row_scale is not None:
            self.scale_rows(row_scale)
        return self.module


_IMPLEMENTS: dict = {}  # layer class -> whether it implements FrozenBase


def frozen_base(module: nn.Module) -> FrozenBase | None:
    """The :class:`FrozenBase` view of a layer: lora's own for Linear / Conv1D, the layer
    itself when it implements the protocol, else None (a layer LoRA cannot fuse or merge).

    The protocol check (tens of microseconds) runs once per layer class: this is called on
    every fused forward.
    """
    if isinstance(module, nn.Linear) or is_fan_in_fan_out(module):
        return DenseBase(module)
    kind = type(module)
    if kind not in _IMPLEMENTS:
        _IMPLEMENTS[kind] = isinstance(module, FrozenBase)
    return module if _IMPLEMENTS[kind] else None
