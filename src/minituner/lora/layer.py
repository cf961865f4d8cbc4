"""The LoRA layer: a frozen Linear-like base plus a trainable low-rank update, and its checks.

A frozen Linear W (out x in) gets a trainable low-rank update: ``W_eff = W + scaling * B @ A``
with ``A`` (r, in), ``B`` (out, r), ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
``B`` starts at zero, so a freshly wrapped layer computes exactly what its base computes.
The layer reaches its base only through :class:`minituner.lora.base.FrozenBase` (fusing,
merging, the base's original layout). Also here: the rank / alpha / dropout / init checks and the
base-layer geometry (``in_features`` and ``out_features``, GPT-2's fan-in-fan-out Conv1D).
Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from minituner.lora.base import DenseBase, frozen_base, is_fan_in_fan_out
from minituner.lora.config import LoRAConfig
from minituner.lora.fused import fused_lora_forward

__all__ = [
    "KNOWN_INITS", "LoRALinear", "check_alpha", "check_dropout", "check_init", "check_rank",
    "is_fan_in_fan_out", "linear_features", "lora_layers", "lora_scaling", "source_fan_in_fan_out",
]

KNOWN_INITS = ("gaussian", "gaussian_std", "kaiming")


def check_rank(r, name: str = "r") -> int:
    """Validate a LoRA rank: a non-negative int (bool is not an int)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"{name} must be a non-negative int, got {r!r}")
    return int(r)


def check_alpha(alpha, name: str = "alpha") -> float:
    """Validate a LoRA alpha: a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_dropout(dropout, name: str = "dropout") -> float:
    """Validate a dropout probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def check_init(init) -> str:
    """Validate the name of an A initialisation."""
    if init not in KNOWN_INITS:
        raise ValueError(f"init must be one of {list(KNOWN_INITS)}, got {init!r}")
    return init


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA; 0 at rank 0 (nothing to scale, no division)."""
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def source_fan_in_fan_out(base: nn.Module) -> bool:
    """True when the layer is, or was built from, a fan-in-fan-out layer (a quantized Conv1D)."""
    frozen = frozen_base(base)
    return frozen is not None and frozen.source_fan_in_fan_out


def linear_features(base: nn.Module) -> tuple:
    """(in_features, out_features) of a layer LoRA can wrap (nn.Linear, a FrozenBase, or any
    layer exposing both; such a layer runs unfused and cannot be merged into).

    A base stored fan-in-fan-out (GPT-2's Conv1D, weight (in, out)) gives (nx, nf).
    """
    frozen = frozen_base(base) or base
    features = getattr(frozen, "in_features", None), getattr(frozen, "out_features", None)
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in features):
        raise ValueError(
            f"base must expose positive int in_features and out_features, got {type(base).__name__}"
        )
    return features



def _adapter_dtype_device(base: nn.Module) -> tuple:
    """Adapter tensors live on the base's device in fp32 (fp64 if the base is fp64)."""
    tensors = list(base.parameters()) + list(base.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return (torch.float64 if torch.float64 in floats else torch.float32), device


class LoRALinear(nn.Module):
    """``base(x) + scaling * dropout(x) @ A^T @ B^T`` around a frozen Linear-like ``base``."""

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "gaussian",
        use_rslora: bool = False,
        freeze_base: bool = True,
        generator: torch.Generator | None = None,
        config: LoRAConfig | None = None,
    ):
        super().__init__()
        self.r = check_rank(r)
        self.alpha = check_alpha(alpha)
        self.dropout_p = check_dropout(dropout)
        self.init = check_init(init)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")
        self.in_features, self.out_features = linear_features(base)
        self.base = base
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(self.r, self.alpha, use_rslora)
        self.fan_in_fan_out = is_fan_in_fan_out(base)  # weight stored (in, out): Conv1D
        self.config = config  # the model-wide settings (apply_lora / load_adapter set them)
        self.disabled = False
        self.merged = False
        self.fused = True  # one autograd function for base + update when the base allows it
        dtype, device = _adapter_dtype_device(base)
        where = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.zeros(self.r, self.in_features, **where))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **where))
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.reset_lora_parameters(generator)
        if freeze_base:
            for param in base.parameters():
                param.requires_grad_(False)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """B = 0; A drawn per ``self.init`` (on CPU in fp32, so a seed gives the same bytes)."""
        self.lora_B.zero_()
        if self.r == 0:
            return
        values = torch.empty(self.r, self.in_features, dtype=torch.float32)
        if self.init == "gaussian":  # variance 1/r (the quiz's N(0, 1/r))
            values.normal_(0.0, 1.0 / math.sqrt(self.r), generator=generator)
        elif self.init == "gaussian_std":  # std 1/r (PEFT's "gaussian")
            values.normal_(0.0, 1.0 / self.r, generator=generator)
        else:  # kaiming-uniform with a = sqrt(5): bound = gain * sqrt(3 / fan_in) = 1/sqrt(in)
            gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
            bound = math.sqrt(3.0) * gain / math.sqrt(self.in_features)
            values.uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(values)

    def set_alpha(self, alpha: float, use_rslora: bool | None = None) -> None:
        """Change alpha (and optionally rsLoRA) and recompute the scaling."""
        self.alpha = check_alpha(alpha)
        if use_rslora is not None:
            self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.use_rslora)

    def _dropout_active(self) -> bool:
        return self.dropout_p > 0 and self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.disabled or self.merged:
            return self.base(x)
        if self.fused and not self._dropout_active():
            out = fused_lora_forward(self, x)
            if out is not None:
                return out
        out = self.base(x)
        return out + self.lora_update(x).to(out.dtype)

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * dropout(x) A^T B^T``: what this adapter adds to the base's output."""
        lora_in = self.dropout(x).to(self.lora_A.dtype)
        return self.scaling * ((lora_in @ self.lora_A.T) @ self.lora_B.T)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout ((out, in); zeros at rank 0)."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, target: str | None = None) -> None:
        """Fold the update into the base (W += delta); a FrozenBase may swap in a new module."""
        self.base = self.merged_base(target)
        self.merged = True

    @torch.no_grad()
    def merged_base(self, target: str | None = None,
                    row_scale: torch.Tensor | None = None) -> nn.Module:
        """The base with ``scaling * B @ A`` added (rows times ``row_scale`` when given), through
        the base's :class:`FrozenBase` ``merged_with``; ``target`` None: its first target."""
        base = frozen_base(self.base)
        if base is None:
            raise ValueError(f"cannot merge into a {type(self.base).__name__} base")
        target = base.merge_targets[0] if target is None else target
        scaled = {} if row_scale is None else {"row_scale": row_scale}  # a plain base may lack it
        return base.merged_with(self.lora_A, self.lora_B, self.scaling, target, **scaled)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of a float base weight (W -= delta)."""
        base = frozen_base(self.base)
        if not isinstance(base, DenseBase):
            raise ValueError(f"cannot unmerge from a {type(self.base).__name__} base")
        base.shift(self.lora_A, self.lora_B, self.scaling, -1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, init={self.init!r}, "
            f"dropout={self.dropout_p:g}, use_rslora={self.use_rslora}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


def lora_layers(model: nn.Module) -> list:
    """(module path, LoRALinear) for every LoRA layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
