"""Merging LoRA into its base: W += scaling * B @ A, the way back, and unloading the wrappers.

Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.lora.layer import lora_layers
from minituner.lora.targets import set_submodule


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: layers merged, the merge target, and merged-vs-unmerged output drift."""

    n_layers: int
    target: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None


def _is_quantized_base(base: nn.Module) -> bool:
    # a QuantizedLinear exists only if it was imported
    qlora = sys.modules.get("minituner.quant.qlora")
    return qlora is not None and isinstance(base, getattr(qlora, "QuantizedLinear", ()))


@torch.no_grad()
def run_probe(model: nn.Module, probe) -> torch.Tensor | None:
    """Model output on ``probe`` (token ids, or a callable taking the model), in eval mode."""
    if probe is None:
        return None
    was_training = model.training
    model.eval()
    try:
        out = probe(model) if callable(probe) else model(probe)
    finally:
        model.train(was_training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float().clone()


def output_drift(before: torch.Tensor | None, after: torch.Tensor | None) -> tuple:
    """(max, mean) absolute difference of two probe outputs, or (None, None)."""
    if before is None or after is None:
        return None, None
    diff = (after - before).abs()
    return float(diff.max()), float(diff.mean())


def _check_float_bases(layers: list) -> None:
    for layer in layers:
        weight = getattr(layer.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(
                f"cannot merge into a {type(layer.base).__name__} base: it has no float weight"
            )


def merge_lora(model: nn.Module, probe=None, target: str | None = None) -> MergeReport:
    """Fold scaling * B @ A into every base weight in place; report drift on ``probe`` if given.

    NF4 bases are handed to ``minituner.quant.qlora.merge_quantized_lora`` (target "dequantized" or
    "requantized"); float bases accept target None or "float". Merging twice is refused.
    """
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    if any(m.merged for m in layers):
        raise ValueError("model is already merged; call unmerge_lora before merging again")
    if any(_is_quantized_base(m.base) for m in layers):
        from minituner.quant.qlora import merge_quantized_lora

        return merge_quantized_lora(model, target=target, probe=probe)
    if target not in (None, "float"):
        raise ValueError(f"target must be None or 'float' for float bases, got {target!r}")
    _check_float_bases(layers)
    before = run_probe(model, probe)
    for layer in layers:
        layer.merge()
    max_diff, mean_diff = output_drift(before, run_probe(model, probe))
    return MergeReport(
        n_layers=len(layers), target="float", max_abs_diff=max_diff, mean_abs_diff=mean_diff
    )


def unmerge_lora(model: nn.Module) -> int:
    """Subtract the merged update again (round trip within float rounding); returns layers done."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    if not layers:
        raise ValueError("model has no merged LoRA layers to unmerge")
    _check_float_bases(layers)
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module, target: str | None = None) -> nn.Module:
    """Merge (unless already merged) and put each base layer back in place; returns the model.

    Base parameters stay frozen (requires_grad=False), as apply_lora left them.
    """
    named = lora_layers(model)
    if not named:
        raise ValueError("model has no LoRA layers to merge and unload")
    if not all(m.merged for _, m in named):
        merge_lora(model, target=target)
    for name, layer in lora_layers(model):
        set_submodule(model, name, layer.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
