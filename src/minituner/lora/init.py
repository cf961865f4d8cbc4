"""Initialisations that move the base: PiSSA, and the conversion every such init needs to save.

**PiSSA** (Meng et al., 2024) starts the adapter on the principal part of the weight instead of
at zero. With the SVD ``W = U S V^T`` (out x in) and its top ``r`` singular triplets,

    A = sqrt(S_r) V_r^T / sqrt(s),    B = U_r sqrt(S_r) / sqrt(s),    W_res = W - s * B A

where ``s`` is the layer's scaling (alpha / r), so ``s * B A = U_r S_r V_r^T`` exactly (PEFT's
convention: it divides S_r by s before the square roots). The frozen base becomes the residual
``W_res``; base + adapter still computes W at step 0, but the adapter now holds the directions
that matter most and trains from there. The SVD is the full one in fp32 (deterministic: the same
weight gives the same bytes; PEFT's ``pissa_niter_K`` fast SVD is not offered). PiSSA needs a
float base (``nn.Linear`` or GPT-2's ``Conv1D``): on an NF4 base the residual would have to be
quantized again (QPiSSA), which minituner does not do; use LoftQ there
(:mod:`minituner.quant.loftq`).

**Saving**: a base-changing init leaves an adapter that only makes sense on the changed base.
:func:`converted_pair` turns it back into an ordinary LoRA adapter on the *original* base
(PEFT's ``path_initial_model_for_weight_conversion``): with ``(A_0, B_0)`` the adapter at
initialisation and ``(A_t, B_t)`` the trained one,

    W_res + s B_t A_t = W + s (B_t A_t - B_0 A_0) = W + s [B_t, -B_0] [A_t; A_0]

a rank-2r adapter whose scaling must stay ``s``: alpha doubles (alpha * sqrt(2) with rsLoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from minituner.lora.base import DenseBase, frozen_base
from minituner.lora.layer import LoRALinear, lora_layers

__all__ = ["BASE_CHANGING_INITS", "apply_pissa", "check_pissa_layer", "converted_alpha",
           "converted_pair", "pissa_init_", "svd_factors"]

BASE_CHANGING_INITS = ("pissa", "loftq")


def svd_factors(matrix: torch.Tensor, r: int, scaling: float) -> tuple:
    """(A (r, in), B (out, r)) in fp32 with ``scaling * B @ A`` the best rank-r approximation of
    ``matrix`` (out, in): the top-r singular triplets, sqrt(S_r / scaling) on each side."""
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0 for an SVD initialisation, got {scaling}")
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def check_pissa_layer(name: str, layer: LoRALinear) -> None:
    """Refuse a layer PiSSA cannot start from: a non-float base, or r above min(out, in)."""
    if not isinstance(frozen_base(layer.base), DenseBase):
        raise ValueError(f"{name}: init 'pissa' needs a float nn.Linear or Conv1D base, got "
                         f"{type(layer.base).__name__} (on an NF4 base use init 'loftq')")
    if layer.r > min(layer.in_features, layer.out_features):
        raise ValueError(f"{name}: init 'pissa' rank {layer.r} is larger than the weight "
                         f"({layer.out_features}, {layer.in_features}) allows")


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> None:
    """PiSSA in place: A, B from the top-r singular vectors of the base weight, the base weight
    replaced by the residual ``W - scaling * B @ A`` (see the module docstring)."""
    check_pissa_layer("layer", layer)
    if layer.r == 0:
        return
    base = frozen_base(layer.base)
    weight = base.compute_weight(torch.float32)
    lora_a, lora_b = svd_factors(weight, layer.r, layer.scaling)
    layer.lora_A.copy_(lora_a)
    layer.lora_B.copy_(lora_b)
    base.shift(layer.lora_A, layer.lora_B, layer.scaling, -1.0)


def apply_pissa(model: nn.Module) -> nn.Module:
    """:func:`pissa_init_` on every LoRA layer of ``model`` (all checked first); returns it."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to initialise with PiSSA")
    for name, layer in layers:
        check_pissa_layer(name, layer)
    for _, layer in layers:
        pissa_init_(layer)
    return model


def converted_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, initial_a: torch.Tensor,
                   initial_b: torch.Tensor) -> tuple:
    """([A_t; A_0], [B_t, -B_0]): the trained adapter minus its initial value as one rank-2r
    LoRA pair, so it applies to the original (unchanged) base."""
    if initial_a.shape != lora_a.shape or initial_b.shape != lora_b.shape:
        raise ValueError(f"initial adapter shapes {tuple(initial_a.shape)} / "
                         f"{tuple(initial_b.shape)} differ from the trained "
                         f"{tuple(lora_a.shape)} / {tuple(lora_b.shape)}")
    initial_a = initial_a.to(lora_a)
    initial_b = initial_b.to(lora_b)
    return torch.cat([lora_a, initial_a], dim=0), torch.cat([lora_b, -initial_b], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scaling when the rank doubles: 2 alpha (sqrt(2) alpha, rsLoRA)."""
    return alpha * (math.sqrt(2.0) if use_rslora else 2.0)
