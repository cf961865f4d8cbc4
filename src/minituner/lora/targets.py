"""Which modules LoRA wraps: Linear-like layers, picked by name suffix or 'all-linear'.

Target resolution (dotted-suffix names, 'all-linear' without the output head), the per-name
rank / alpha patterns, and replacing a submodule by path. Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from minituner.lora.layer import LoRALinear, linear_features

__all__ = [
    "ALL_LINEAR", "MINIGPT_TARGETS", "check_patterns", "is_linear_like", "pattern_value",
    "resolve_target_modules", "set_submodule", "suffix_matches",
]

MINIGPT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
ALL_LINEAR = "all-linear"


def is_linear_like(module: nn.Module) -> bool:
    """True for layers LoRA can wrap: nn.Linear, GPT-2's Conv1D, or a module with
    in/out_features (NF4 linear)."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    try:
        linear_features(module)
    except ValueError:
        return False
    return True



def suffix_matches(name: str, target: str) -> bool:
    """Dotted-suffix match on dot boundaries: 'q_proj' matches 'blocks.0.attn.q_proj'."""
    return name == target or name.endswith("." + target)


def check_patterns(patterns, label: str, check_value) -> dict:
    """Validate a rank/alpha pattern mapping: regex keys, values passing ``check_value``."""
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise ValueError(f"{label} must be a mapping of module-name pattern -> value")
    for key, value in patterns.items():
        try:
            re.compile(str(key))
        except re.error as exc:
            raise ValueError(f"{label} key {key!r} is not a valid pattern ({exc})") from None
        check_value(value, f"{label}[{key!r}]")
    return dict(patterns)


def pattern_value(patterns: Mapping | None, name: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$``, else default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _tied_to_embedding(model: nn.Module, module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    for other in model.modules():
        if isinstance(other, nn.Embedding) and (
            other.weight is weight
            or (not weight.is_meta and other.weight.data_ptr() == weight.data_ptr())
        ):
            return True
    return False


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def resolve_target_modules(model: nn.Module, target_modules) -> list:
    """Names of the Linear-like modules selected by a name list (dotted suffixes) or 'all-linear'.

    'all-linear' takes every Linear except the output head (named ``lm_head``, the model's
    output embeddings, or a Linear whose weight is tied to an input embedding).
    """
    linears = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    if target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [
            n for n, m in linears
            if n.rsplit(".", 1)[-1] != "lm_head"
            and m is not head
            and not _tied_to_embedding(model, m)
        ]
    if isinstance(target_modules, str) or not isinstance(target_modules, Sequence):
        raise ValueError(
            f"target_modules must be a list of module names or {ALL_LINEAR!r}, "
            f"got {target_modules!r}"
        )
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be non-empty module names, got {target_modules!r}")
    linear_names = [n for n, _ in linears]
    all_names = [n for n, _ in model.named_modules() if n]
    for target in target_modules:
        if not any(suffix_matches(n, target) for n in linear_names):
            others = [n for n in all_names if suffix_matches(n, target)]
            hint = f" (it matches non-Linear module(s) {others})" if others else ""
            raise ValueError(
                f"target_modules entry {target!r} matches no Linear{hint}; the model's Linear "
                f"modules are: {linear_names}"
            )
    return [n for n in linear_names if any(suffix_matches(n, t) for t in target_modules)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)

