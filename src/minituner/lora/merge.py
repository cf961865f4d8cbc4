"""Merging LoRA into its base: W += scaling * B @ A, the way back, and unloading the wrappers.

Every base is merged through :class:`minituner.lora.base.FrozenBase`: a float Linear / Conv1D
in place (target "float"), any other base as it declares (an NF4 base's ``merge_targets`` are
"dequantized" and "requantized"). Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.lora.base import DenseBase, frozen_base
from minituner.lora.layer import lora_layers
from minituner.lora.targets import set_submodule


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: layers merged, the merge target, and merged-vs-unmerged output drift."""

    n_layers: int
    target: str
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None


def check_finite(named: Iterable, source: str) -> None:
    """Raise a one-line ValueError naming the first (name, tensor) of ``named`` that holds NaN
    or inf: such a tensor would silently turn every output it touches into NaN."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source}: tensor {name} holds {bad} non-finite value(s) "
                             "(NaN or inf); refusing it")


def _adapter_tensors(named_layers: list) -> list:
    return [(f"{name}.{part}", getattr(layer, part).detach()) for name, layer in named_layers
            for part in ("lora_A", "lora_B")]


def _base_tensors(named_layers: list) -> list:
    return [(f"{name}.base.{key}", tensor) for name, layer in named_layers
            for key, tensor in layer.base.state_dict().items()]


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


def _frozen_bases(layers: list) -> list:
    """Each layer's FrozenBase; a base that is none of them cannot be merged into."""
    bases = []
    for layer in layers:
        base = frozen_base(layer.base)
        if base is None:
            raise ValueError(f"cannot merge into a {type(layer.base).__name__} base: it is no "
                             "nn.Linear, Conv1D or FrozenBase")
        if isinstance(base, DenseBase) and not base.module.weight.is_floating_point():
            raise ValueError(
                f"cannot merge into a {type(layer.base).__name__} base: it has no float weight"
            )
        bases.append(base)
    return bases


def _merge_target(bases: list, target: str | None) -> str:
    """The one target every base accepts: float bases take None or "float"; other bases
    declare theirs (the first is the default), and float layers beside them merge in place."""
    declared = [base for base in bases if not isinstance(base, DenseBase)]
    if not declared:
        if target not in (None, "float"):
            raise ValueError(f"target must be None or 'float' for float bases, got {target!r}")
        return "float"
    target = declared[0].merge_targets[0] if target is None else target
    for base in declared:
        if target not in base.merge_targets:
            raise ValueError(f"target must be one of {list(base.merge_targets)}, got {target!r}")
    return target


def merge_lora(model: nn.Module, probe=None, target: str | None = None) -> MergeReport:
    """Fold scaling * B @ A into every base in place; report drift on ``probe`` if given.

    Float bases accept target None or "float"; a base implementing FrozenBase itself names its
    own targets (NF4: "dequantized", the default, or "requantized"). Merging twice is refused,
    and so is an adapter holding NaN/inf; a merged weight that is not finite (an overflow) is an
    error naming the tensor, after which the model must not be written.
    """
    named = lora_layers(model)
    layers = [m for _, m in named]
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    if any(m.merged for m in layers):
        raise ValueError("model is already merged; call unmerge_lora before merging again")
    target = _merge_target(_frozen_bases(layers), target)
    check_finite(_adapter_tensors(named), "merge")
    before = run_probe(model, probe)
    for layer in layers:
        layer.merge(target)
    check_finite(_base_tensors(lora_layers(model)), "merged weights")
    max_diff, mean_diff = output_drift(before, run_probe(model, probe))
    return MergeReport(
        n_layers=len(layers), target=target, max_abs_diff=max_diff, mean_abs_diff=mean_diff
    )


def unmerge_lora(model: nn.Module) -> int:
    """Subtract the merged update again (round trip within float rounding); returns layers done."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    if not layers:
        raise ValueError("model has no merged LoRA layers to unmerge")
    for layer in layers:
        if not isinstance(frozen_base(layer.base), DenseBase):
            raise ValueError(f"cannot unmerge from a {type(layer.base).__name__} base")
    for layer in layers:
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module, target: str | None = None) -> nn.Module:
    """Merge (unless already merged) and put each base layer back in place; returns the model.

    Base parameters stay frozen (requires_grad=False), as apply_lora left them. The LoRA
    settings (each layer's ``config``) leave with the layers.
    """
    named = lora_layers(model)
    if not named:
        raise ValueError("model has no LoRA layers to merge and unload")
    if not all(m.merged for _, m in named):
        merge_lora(model, target=target)
    for name, layer in lora_layers(model):
        set_submodule(model, name, layer.base)
    return model
