"""Which modules LoRA wraps: Linear-like layers, picked by name suffix, regex or 'all-linear'.

Target resolution follows PEFT's ``target_modules``: a list of names is a dotted-suffix match,
one string (other than 'all-linear') is a regex that must match the whole module path;
``exclude_modules`` uses the same two rules and ``layers_to_transform`` keeps the modules whose
first numbered path component (``model.layers.3.``) is listed. Also the per-name rank / alpha
patterns, and replacing a submodule by path. Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from minituner.lora.layer import LoRALinear, linear_features

__all__ = [
    "ALL_LINEAR", "MINIGPT_TARGETS", "check_patterns", "is_linear_like", "is_regex",
    "layer_index", "name_matches", "pattern_value", "resolve_target_modules", "set_submodule",
    "suffix_matches", "target_spec",
]

MINIGPT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
ALL_LINEAR = "all-linear"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's rule: the first numbered component


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


def is_regex(text: str) -> bool:
    """True when ``text`` holds a character a module name cannot (``*``, ``|``, ``(`` ...)."""
    return not _PLAIN_NAME.fullmatch(text)


def target_spec(names):
    """PEFT's form of a list of --targets / --exclude values: 'all-linear', one regex string,
    or the list of names (None stays None)."""
    if names is None or isinstance(names, str):
        return names
    names = list(names)
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    if len(names) == 1 and is_regex(names[0]):
        return names[0]
    if any(is_regex(n) for n in names):
        raise ValueError(f"give one regex or a list of module names, got {names!r}")
    return names


def name_matches(name: str, spec) -> bool:
    """PEFT's rule: a string is a regex matched against the whole path, a list a suffix match."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(suffix_matches(name, t) for t in spec)


def layer_index(name: str) -> int | None:
    """The layer a module path belongs to (``model.layers.3.mlp`` -> 3), None outside layers."""
    match = _LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None


def _compile(spec, label: str) -> None:
    try:
        re.compile(spec)
    except re.error as exc:
        raise ValueError(f"{label} regex {spec!r} is not a valid pattern ({exc})") from None


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


def resolve_target_modules(model: nn.Module, target_modules, exclude_modules=None,
                           layers_to_transform=None) -> list:
    """Names of the Linear-like modules selected by a name list (dotted suffixes), a regex
    (full match on the path) or 'all-linear', less ``exclude_modules`` (names or a regex), in
    the layers ``layers_to_transform`` (a list of layer indices) when given.

    'all-linear' takes every Linear except the output head (named ``lm_head``, the model's
    output embeddings, or a Linear whose weight is tied to an input embedding).
    """
    linears = [(n, m) for n, m in model.named_modules() if is_linear_like(m)]
    linear_names = [n for n, _ in linears]
    if target_modules == ALL_LINEAR:
        head = _output_head(model)
        names = [
            n for n, m in linears
            if n.rsplit(".", 1)[-1] != "lm_head"
            and m is not head
            and not _tied_to_embedding(model, m)
        ]
    elif isinstance(target_modules, str):
        names = _regex_targets(model, target_modules, "target_modules", linear_names)
    else:
        names = _listed_targets(model, target_modules, linear_names)
    if exclude_modules is not None:
        names = _excluded(names, exclude_modules)
    if layers_to_transform is not None:
        names = _in_layers(names, layers_to_transform, linear_names)
    return names


def _regex_targets(model: nn.Module, spec: str, label: str, linear_names: list) -> list:
    _compile(spec, label)
    names = [n for n in linear_names if re.fullmatch(spec, n)]
    if not names:
        others = [n for n, _ in model.named_modules() if n and re.fullmatch(spec, n)]
        hint = f" (it matches non-Linear module(s) {others})" if others else ""
        raise ValueError(f"{label} regex {spec!r} matches no Linear module path{hint}; tried "
                         f"against: {linear_names}")
    return names


def _listed_targets(model: nn.Module, target_modules, linear_names: list) -> list:
    if not isinstance(target_modules, Sequence):
        raise ValueError(
            f"target_modules must be a list of module names, a regex or {ALL_LINEAR!r}, "
            f"got {target_modules!r}"
        )
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be non-empty module names, got {target_modules!r}")
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


def _excluded(names: list, exclude_modules) -> list:
    """``names`` less the excluded ones; an exclusion that removes nothing is refused."""
    if isinstance(exclude_modules, str):
        _compile(exclude_modules, "exclude_modules")
    elif not exclude_modules or not all(isinstance(t, str) and t for t in exclude_modules):
        raise ValueError(f"exclude_modules must be module names or a regex, "
                         f"got {exclude_modules!r}")
    kept = [n for n in names if not name_matches(n, exclude_modules)]
    if len(kept) == len(names):
        raise ValueError(f"exclude_modules {exclude_modules!r} excludes none of the targeted "
                         f"modules: {names}")
    if not kept:
        raise ValueError(f"exclude_modules {exclude_modules!r} excludes every targeted module")
    return kept


def _in_layers(names: list, layers: Sequence, linear_names: list) -> list:
    """The modules of ``names`` inside the listed layers; none left is refused."""
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                             for i in layers):
        raise ValueError(f"layers_to_transform must be non-negative layer indices, got {layers!r}")
    wanted = set(layers)
    kept = [n for n in names if layer_index(n) in wanted]
    if not kept:
        found = sorted({i for i in map(layer_index, linear_names) if i is not None})
        raise ValueError(f"layers_to_transform {sorted(wanted)} selects no targeted module; the "
                         f"model's layers are {found}")
    return kept


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)

