"""LoRA from first principles: a wrapped Linear, injection by module name, counting and merging.

A frozen Linear W (out x in) gets a trainable low-rank update: ``W_eff = W + scaling * B @ A``
with ``A`` (r, in), ``B`` (out, r), ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
``B`` starts at zero, so a freshly wrapped model computes exactly what its base computes.

Names: every trainable tensor is called ``lora_A`` / ``lora_B``; the wrapped layer lives at
``<module path>.base``. :func:`lora_state_dict` keys are ``<module path>.lora_A`` and
``<module path>.lora_B`` (the model's own state-dict keys for those tensors).

This module holds injection, counting and adapter state dicts.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from minituner.lora.config import LoRAConfig
from minituner.lora.dora import DoRALinear
from minituner.lora.init import apply_pissa, check_pissa_layer
from minituner.lora.layer import (
    LoRALinear,
    check_alpha,
    check_dropout,
    check_init,
    check_rank,
    linear_features,
    lora_layers,
)
from minituner.lora.targets import (
    MINIGPT_TARGETS,
    check_patterns,
    pattern_value,
    resolve_target_modules,
    set_submodule,
)

# ----------------------------------------------------------------------------- injection


def is_lora_name(name: str) -> bool:
    """True for a LoRA tensor name (its last component starts with ``lora_``)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")



def install_lora_layers(model: nn.Module, layers: Mapping, config: LoRAConfig) -> nn.Module:
    """Swap prepared LoRALinear layers in by path, freeze every non-LoRA tensor; every layer
    holds ``config``."""
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    for name, layer in layers.items():
        layer.config = config
        set_submodule(model, name, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name))
    return model


def model_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig the model's LoRA layers hold (None without LoRA layers or settings)."""
    configs = {id(layer.config): layer.config for _, layer in lora_layers(model)}
    if len(configs) > 1:
        raise ValueError("the model's LoRA layers hold different configs")
    return next(iter(configs.values()), None)


def set_model_lora_config(model: nn.Module, config: LoRAConfig) -> None:
    """Give every LoRA layer of the model ``config``."""
    for _, layer in lora_layers(model):
        layer.config = config


def apply_lora(
    model: nn.Module,
    target_modules,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str = "gaussian",
    use_rslora: bool = False,
    rank_pattern: Mapping | None = None,
    alpha_pattern: Mapping | None = None,
    seed: int | None = None,
    use_dora: bool = False,
    exclude_modules=None,
    layers_to_transform: Sequence | None = None,
) -> nn.Module:
    """Wrap the targeted Linears in place with LoRALinear (DoRALinear with ``use_dora``) and
    freeze the rest; returns the model.

    All checks run before the model is touched. Every new layer holds the settings as a
    :class:`~minituner.lora.config.LoRAConfig` (read them with :func:`model_lora_config`).
    ``init="pissa"`` starts A and B on the weights' top singular vectors and leaves the
    residual in the base (:mod:`minituner.lora.init`); LoftQ lives in
    :mod:`minituner.quant.loftq`, since it quantizes the base. ``target_modules``,
    ``exclude_modules`` and ``layers_to_transform`` follow PEFT
    (:func:`minituner.lora.targets.resolve_target_modules`).
    """
    r, alpha = check_rank(r), check_alpha(alpha)
    dropout = check_dropout(dropout)
    pissa = init == "pissa"
    if init == "loftq":
        raise ValueError("init 'loftq' quantizes the base: use minituner.quant.loftq "
                         "(wrap_minigpt_qlora(init='loftq') or apply_loftq)")
    init = "pissa" if pissa else check_init(init)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; apply_lora runs once per model")
    rank_pattern = check_patterns(rank_pattern, "rank_pattern", check_rank)
    alpha_pattern = check_patterns(alpha_pattern, "alpha_pattern", check_alpha)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be a bool, got {use_dora!r}")
    if use_dora and pissa:
        raise ValueError("init 'pissa' cannot be used with use_dora=True (DoRA's magnitude "
                         "starts from the base's row norms; PiSSA changes the base)")
    layers_to_transform = None if layers_to_transform is None else list(layers_to_transform)
    names = resolve_target_modules(model, target_modules, exclude_modules, layers_to_transform)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} selects no Linear in the model")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    config = LoRAConfig(
        r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora,
        target_modules=target_modules if isinstance(target_modules, str)
        else list(target_modules),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, seed=seed, use_dora=use_dora,
        exclude_modules=exclude_modules if exclude_modules is None
        or isinstance(exclude_modules, str) else list(exclude_modules),
        layers_to_transform=layers_to_transform,
    )
    layer_class = DoRALinear if use_dora else LoRALinear
    layers = {
        name: layer_class(
            model.get_submodule(name),
            r=pattern_value(rank_pattern, name, r),
            alpha=pattern_value(alpha_pattern, name, alpha),
            dropout=dropout, init="kaiming" if pissa else init, use_rslora=use_rslora,
            freeze_base=False, generator=generator, config=config,
        )
        for name in names
    }
    if pissa:  # refuse what PiSSA cannot start from before the model is touched
        for name, layer in layers.items():
            check_pissa_layer(name, layer)
    install_lora_layers(model, layers, config)
    return apply_pissa(model) if pissa else model


def wrap_minigpt_with_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence = MINIGPT_TARGETS,
    dropout: float = 0.0,
    **kwargs,
) -> nn.Module:
    """The course's name: LoRA on Mini-GPT's Linears (all 12 by default) via :func:`apply_lora`."""
    return apply_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout, **kwargs)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; the adapters' state is restored after."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise ValueError("cannot disable merged adapters; call unmerge_lora first")
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, previous, strict=True):
            m.disabled = flag


# ----------------------------------------------------------------------------- counting


def count_lora_params(model: nn.Module) -> int:
    """Number of LoRA scalars (``lora_`` tensors); Mini-GPT with all 12 Linears: 2304 r."""
    return sum(p.numel() for n, p in model.named_parameters() if is_lora_name(n))


def lora_ratio(h: int, r: int) -> float:
    """LoRA-to-full trainable ratio for a square h x h Linear: r * (h + h) / h^2 = 2r / h."""
    if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h <= 0:
        raise ValueError(f"h must be a positive int, got {h!r}")
    return 2 * check_rank(r) / h


def lora_param_table(model: nn.Module, r: int, target_modules=MINIGPT_TARGETS) -> dict:
    """Per-Linear rows (name, shape, full params, r*(in+out), ratio) and totals for a plain model.

    "full params" counts the weight matrix LoRA adapts (out * in), not the bias.
    """
    r = check_rank(r)
    rows = []
    for name in resolve_target_modules(model, target_modules):
        fan_in, fan_out = linear_features(model.get_submodule(name))
        full, lora = fan_in * fan_out, r * (fan_in + fan_out)
        rows.append({"name": name, "shape": [fan_out, fan_in], "full_params": full,
                     "lora_params": lora, "ratio": lora / full})
    full_total = sum(row["full_params"] for row in rows)
    lora_total = sum(row["lora_params"] for row in rows)
    model_params = sum(p.numel() for p in model.parameters())
    totals = {"n_linears": len(rows), "full_params": full_total, "lora_params": lora_total,
              "ratio": lora_total / full_total, "model_params": model_params,
              "fraction_of_model": lora_total / model_params}
    return {"rank": r, "rows": rows, "totals": totals}


# ----------------------------------------------------------------------------- state dicts


def lora_state_dict(model: nn.Module) -> dict:
    """Adapter tensors only, keyed ``<module path>.lora_A`` / ``.lora_B`` (detached copies)."""
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers")
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_name(n)}


def load_lora_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Copy adapter tensors into the model; every key and shape is checked before any write."""
    params = {n: p for n, p in model.named_parameters() if is_lora_name(n)}
    if not params:
        raise ValueError("model has no LoRA layers to load into")
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, param in params.items():
        if tuple(state_dict[name].shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA state dict: {name} has shape {tuple(state_dict[name].shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state_dict[name])
