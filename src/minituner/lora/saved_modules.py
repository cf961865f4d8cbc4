"""Modules trained in full beside the adapters: PEFT's ``modules_to_save``.

Each chosen module (say ``lm_head`` or ``model.embed_tokens``) is replaced by a trainable copy,
as PEFT's wrapper does: a weight the module shared with another one (GPT-2's tied ``wte`` and
``lm_head``) is not shared by the copy, so training the copy leaves the other module as it was.
The adapter file stores a copy's tensors under the plain module's keys,
``base_model.model.<module path>.<tensor>`` (PEFT drops its ``modules_to_save.default`` level
when saving), and lists the module paths in ``modules_to_save``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn as nn

from minituner.lora.config import LoRAConfig
from minituner.lora.inject import model_lora_config, set_model_lora_config
from minituner.lora.layer import lora_layers
from minituner.lora.targets import set_submodule, suffix_matches

__all__ = ["apply_modules_to_save", "load_saved_modules", "resolve_modules_to_save",
           "saved_module_paths", "saved_module_tensors"]


def resolve_modules_to_save(model: nn.Module, names: Sequence) -> list:
    """Module paths named by ``names`` (PEFT's rule: a dotted-suffix match), refusing a name
    that matches nothing or a module holding LoRA layers."""
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"modules_to_save must be a list of module names, got {names!r}")
    paths = [n for n, _ in model.named_modules() if n]
    wrapped = [n for n, _ in lora_layers(model)]
    chosen = []
    for name in names:
        found = [p for p in paths if suffix_matches(p, name)]
        if not found:
            tops = [p for p in paths if p.count(".") < 2]
            raise ValueError(f"modules_to_save entry {name!r} matches no module; the model's "
                             f"top-level modules are: {tops}")
        for path in found:
            if any(w == path or w.startswith(path + ".") or path.startswith(w + ".")
                   for w in wrapped):
                raise ValueError(f"modules_to_save entry {name!r} ({path}) holds or is a LoRA "
                                 "target: a module is either adapted or trained in full")
        chosen.extend(p for p in found if p not in chosen)
    return chosen


def apply_modules_to_save(model: nn.Module, names: Sequence) -> list:
    """Replace each module ``names`` selects by a trainable, untied copy; returns their paths.

    Run it after :func:`minituner.lora.apply_lora` (which freezes everything but LoRA); the
    model's :class:`~minituner.lora.config.LoRAConfig` records the paths.
    """
    config = model_lora_config(model)
    if config is None:
        raise ValueError("modules_to_save needs a model with LoRA layers (apply_lora first)")
    paths = resolve_modules_to_save(model, names)
    for path in paths:
        trained = copy.deepcopy(model.get_submodule(path))
        for param in trained.parameters():
            param.requires_grad_(True)
        set_submodule(model, path, trained)
    set_model_lora_config(model, replace(config, modules_to_save=paths))
    return paths


def saved_module_paths(model: nn.Module) -> list:
    """Paths of the modules trained in full (none: an empty list)."""
    config = model_lora_config(model)
    return list(config.modules_to_save or []) if isinstance(config, LoRAConfig) else []


def saved_module_tensors(model: nn.Module, prefix: str) -> dict:
    """``prefix + <path>.<tensor>`` -> tensor (CPU, contiguous) of every module trained in full."""
    out = {}
    for path in saved_module_paths(model):
        for key, tensor in model.get_submodule(path).state_dict().items():
            out[f"{prefix}{path}.{key}"] = tensor.detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_saved_modules(model: nn.Module, paths: list, tensors: dict) -> None:
    """Install trainable copies at ``paths`` holding ``tensors`` ({path: {key: tensor}})."""
    apply_modules_to_save(model, paths)
    for path in paths:
        model.get_submodule(path).load_state_dict(tensors[path], strict=True)
