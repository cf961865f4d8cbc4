"""LoRA from first principles: a wrapped Linear, injection by module name, counting and merging.

A frozen Linear W (out x in) gets a trainable low-rank update: ``W_eff = W + scaling * B @ A``
with ``A`` (r, in), ``B`` (out, r), ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
``B`` starts at zero, so a freshly wrapped model computes exactly what its base computes.

Names: every trainable tensor is called ``lora_A`` / ``lora_B``; the wrapped layer lives at
``<module path>.base``. :func:`lora_state_dict` keys are ``<module path>.lora_A`` and
``<module path>.lora_B`` (the model's own state-dict keys for those tensors).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from minituner.lora_fused import fused_kind, fused_lora_forward
from minituner.lora_merge import (  # re-exported: merging is part of the LoRA API
    MergeReport,
    merge_and_unload,
    merge_lora,
    output_drift,
    run_probe,
    unmerge_lora,
)

__all__ = [
    "ALL_LINEAR", "KNOWN_INITS", "MINIGPT_TARGETS", "LoRALinear", "MergeReport", "apply_lora",
    "check_alpha", "check_dropout", "check_init", "check_patterns", "check_rank",
    "count_lora_params", "disable_adapters", "install_lora_layers", "is_fan_in_fan_out",
    "is_linear_like",
    "is_lora_name", "linear_features", "load_lora_state_dict", "lora_layers", "lora_param_table",
    "lora_ratio", "lora_scaling", "lora_state_dict", "merge_and_unload", "merge_lora",
    "output_drift", "pattern_value", "resolve_target_modules", "run_probe", "set_submodule",
    "source_fan_in_fan_out",
    "suffix_matches", "unmerge_lora", "wrap_minigpt_with_lora",
]

KNOWN_INITS = ("gaussian", "gaussian_std", "kaiming")
MINIGPT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
ALL_LINEAR = "all-linear"


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


def source_fan_in_fan_out(base: nn.Module) -> bool:
    """True when the layer is, or was built from, a fan-in-fan-out layer (a quantized Conv1D)."""
    return is_fan_in_fan_out(base) or bool(getattr(base, "source_fan_in_fan_out", False))


def linear_features(base: nn.Module) -> tuple:
    """(in_features, out_features) of a layer LoRA can wrap (nn.Linear or anything exposing both).

    A base stored fan-in-fan-out (GPT-2's Conv1D, weight (in, out)) gives (nx, nf).
    """
    if is_fan_in_fan_out(base):
        return base.nx, base.nf
    features = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in features):
        raise ValueError(
            f"base must expose positive int in_features and out_features, got {type(base).__name__}"
        )
    return features


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
        kind = fused_kind(self.base, x) if self.fused and not self._dropout_active() else None
        if kind is not None:
            return fused_lora_forward(self, x, kind)
        out = self.base(x)
        lora_in = self.dropout(x).to(self.lora_A.dtype)
        update = (lora_in @ self.lora_A.T) @ self.lora_B.T
        return out + (self.scaling * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout ((out, in); zeros at rank 0)."""
        delta = self.scaling * (self.lora_B @ self.lora_A)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into a float base weight (W += delta)."""
        self._shift_base_weight(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (W -= delta)."""
        self._shift_base_weight(-1.0)
        self.merged = False

    def _shift_base_weight(self, sign: float) -> None:
        weight, a, b = self.base.weight, self.lora_A, self.lora_B
        if weight.dtype == a.dtype and weight.device == a.device and self.r > 0:
            # W += sign * scaling * B @ A as one in-place GEMM: no (out, in) temporary
            left, right = (a.t(), b.t()) if self.fan_in_fan_out else (b, a)
            weight.addmm_(left, right, alpha=sign * self.scaling)
            return
        weight.add_((sign * self.delta_weight()).to(device=weight.device, dtype=weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, init={self.init!r}, "
            f"dropout={self.dropout_p:g}, use_rslora={self.use_rslora}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


# ----------------------------------------------------------------------------- injection


def lora_layers(model: nn.Module) -> list:
    """(module path, LoRALinear) for every LoRA layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def is_lora_name(name: str) -> bool:
    """True for a LoRA tensor name (its last component starts with ``lora_``)."""
    return name.rsplit(".", 1)[-1].startswith("lora_")


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


def install_lora_layers(model: nn.Module, layers: Mapping, lora_config: dict) -> nn.Module:
    """Swap prepared LoRALinear layers in by path, freeze every non-LoRA tensor, record config."""
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name))
    model.lora_config = dict(lora_config)
    return model


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
) -> nn.Module:
    """Wrap the targeted Linears in place with LoRALinear and freeze the rest; returns the model.

    All checks run before the model is touched. The config is kept as ``model.lora_config``.
    """
    r, alpha = check_rank(r), check_alpha(alpha)
    dropout, init = check_dropout(dropout), check_init(init)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; apply_lora runs once per model")
    rank_pattern = check_patterns(rank_pattern, "rank_pattern", check_rank)
    alpha_pattern = check_patterns(alpha_pattern, "alpha_pattern", check_alpha)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    names = resolve_target_modules(model, target_modules)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} selects no Linear in the model")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = {
        name: LoRALinear(
            model.get_submodule(name),
            r=pattern_value(rank_pattern, name, r),
            alpha=pattern_value(alpha_pattern, name, alpha),
            dropout=dropout, init=init, use_rslora=use_rslora,
            freeze_base=False, generator=generator,
        )
        for name in names
    }
    config = {
        "r": r, "alpha": alpha, "dropout": dropout, "init": init, "use_rslora": use_rslora,
        "target_modules": target_modules if target_modules == ALL_LINEAR else list(target_modules),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "seed": seed,
    }
    return install_lora_layers(model, layers, config)


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

