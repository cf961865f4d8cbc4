"""DoRA, weight-decomposed LoRA: a trainable magnitude per output row on top of LoRA's direction.

DoRA (Liu et al., 2024) splits the adapted weight into a magnitude and a direction::

    W' = m * (W + s B A) / ||W + s B A||_c

``W`` is the frozen (out, in) base weight, ``s B A`` LoRA's update (``s = alpha / r``), and
``||.||_c`` the L2 norm of each output row, taken over the input dimension (PEFT's
``weight_norm`` over dim 1 of the (out, in) weight; GPT-2's Conv1D stores (in, out) and is read
in the (out, in) layout). ``m`` (``lora_magnitude_vector``, shape (out,)) starts at ``||W||_c``,
so a fresh layer computes exactly its base, as ``B = 0`` does for LoRA.

The paper's efficient form (its section 4.3) treats the norm as a constant: it is computed
without autograd in every forward, so gradients reach ``m``, ``A`` and ``B`` but never flow
through the norm. With ``g = m / ||W + s B A||_c`` (detached norm) and bias ``b`` the layer is::

    y = g * (x W^T + s x A^T B^T) + b = g * lora_y + (1 - g) * b

where ``lora_y`` is the ordinary LoRA layer's output (the fused LoRA function when the base
allows it). Autograd keeps ``lora_y`` (tokens x out) for the gradient of ``m``; nothing else is
added to what LoRA keeps. With dropout the dropped input feeds only the LoRA branch (as in
LoRA); PEFT also runs the base on the dropped input while training, so training-time outputs
with dropout differ from PEFT's, eval-time outputs do not.

Rank 0: ``B A`` is the zero matrix, so the layer is ``(m / ||W||_c) * W`` -- magnitude-only
fine-tuning, ``out`` trainable scalars per layer, exactly the base while ``m = ||W||_c``.

The base is reached through :class:`~minituner.lora.base.FrozenBase` (``compute_weight``
dequantizes an NF4 base), so DoRA works on float and quantized bases without importing
quantization code. Merging folds ``W' `` into the base (``merged_with`` with a row scale ``g``);
unmerging a float base divides by the same ``g`` and subtracts ``s B A``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minituner.lora.base import DenseBase, frozen_base
from minituner.lora.layer import LoRALinear

__all__ = ["DoRALinear", "dora_layers"]


class DoRALinear(LoRALinear):
    """``m * (W + s B A) / ||W + s B A||_c`` around a frozen base (see the module docstring)."""

    def __init__(self, base: nn.Module, *args, **kwargs):
        if frozen_base(base) is None:
            raise ValueError(
                f"DoRA needs a base whose weight it can read (nn.Linear, Conv1D or a "
                f"FrozenBase such as an NF4 layer), got {type(base).__name__}"
            )
        super().__init__(base, *args, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.zeros(self.out_features, dtype=self.lora_A.dtype, device=self.lora_A.device))
        self.merged_scale: torch.Tensor | None = None  # g at merge time (unmerge divides by it)
        self.reset_magnitude()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_c: the L2 norm of each output row of the adapted weight, without grad."""
        weight = frozen_base(self.base).compute_weight(self.lora_A.dtype)
        weight = weight.to(self.lora_A.device)
        if self.r > 0:
            weight.addmm_(self.lora_B, self.lora_A, alpha=self.scaling)
        return torch.linalg.vector_norm(weight, dim=1)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_c, so the layer computes W + s B A (the base while B = 0)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ||W + s B A||_c per output row (gradient to m only; a zero row gives g = 0)."""
        norm = self.weight_norm().clamp_min(torch.finfo(self.lora_A.dtype).tiny)
        return self.lora_magnitude_vector / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        lora_out = self._lora_output(x)
        scale = self.magnitude_scale().to(lora_out.dtype)
        bias = getattr(self.base, "bias", None)
        if bias is None:
            return lora_out * scale
        bias = bias.to(lora_out.dtype)
        return torch.addcmul(bias - bias * scale, lora_out, scale)  # g * lora_y + (1 - g) * b

    def _lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s x A^T B^T: the plain LoRA layer's output (fused when the base allows)."""
        return self.base(x) if self.r == 0 else super().forward(x)

    def delta_weight(self) -> torch.Tensor:
        """W' - W = (g - 1) W + g s B A in the base weight's layout (zeros while m = ||W||_c)."""
        with torch.no_grad():
            weight = frozen_base(self.base).compute_weight(self.lora_A.dtype)
            scale = self.magnitude_scale().detach()[:, None]
            delta = (scale - 1) * weight.to(scale.device)
            if self.r > 0:
                delta += scale * (self.scaling * (self.lora_B @ self.lora_A))
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, target: str | None = None) -> None:
        """Fold W' into the base: W <- g * (W + s B A); a FrozenBase may swap in a new module."""
        scale = self.magnitude_scale().detach().clone()
        self.base = self.merged_base(target, row_scale=scale)
        self.merged_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take W' back out of a float base: W <- W / g - s B A."""
        base = frozen_base(self.base)
        if not isinstance(base, DenseBase):
            raise ValueError(f"cannot unmerge from a {type(self.base).__name__} base")
        if self.merged_scale is None or not bool((self.merged_scale != 0).all()):
            raise ValueError("cannot unmerge DoRA: a merged row was scaled by 0 (m = 0)")
        base.scale_rows(1.0 / self.merged_scale)
        base.shift(self.lora_A, self.lora_B, self.scaling, -1.0)
        self.merged_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"


def dora_layers(model: nn.Module) -> list:
    """(module path, DoRALinear) for every DoRA layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALinear)]
