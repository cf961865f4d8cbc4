"""Several named adapters on one frozen base: load, switch, disable, delete, combine, mix rows.

Each adapted layer becomes a :class:`MultiLoRALinear`: the frozen base plus a dict of named
:class:`LoRAAdapter` modules. Each adapter adds its own update to the base output,

    y = base(x) + scaling_n * dropout(x) A_n^T B_n^T        (n: the active adapter)

so switching adapters moves no weights, and a batch can send each row through a different
adapter (``"__base__"``: the base alone), all in one forward: the rows that use adapter n are
gathered, their update is computed with A_n and B_n, and added back in place.

Adapters are read from PEFT-format folders with :func:`minituner.lora.adapters.load_adapter`
on the bare base, so each one passes the same checks as a single adapter (keys, shapes, the
base fingerprint); adapters of different bases cannot share a model.

:func:`add_weighted_adapter` builds a new adapter from weighted old ones (weights w_i, each
adapter's delta ``delta_i = s_i B_i A_i``, s_i its scaling); the new one has scaling 1, as in
PEFT (lora_alpha = r):

- ``"cat"`` stacks the ranks: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so
  B A = sum_i w_i delta_i exactly; its rank is the sum of the ranks.
- ``"linear"`` (equal ranks) adds the factors: with c_i = w_i s_i,
  A = sum_i sign(c_i) sqrt(|c_i|) A_i and B = sum_i sqrt(|c_i|) B_i. B A holds cross terms
  B_i A_j, so it is not the weighted sum of the deltas (PEFT's convention, a cheap mix).
- ``"svd"`` (any ranks) takes the weighted sum D = sum_i w_i delta_i and keeps its best
  rank-r approximation: D = U S V^T, B = U_r S_r, A = V_r^T (r: ``rank``, default the largest
  rank among the adapters).

A layer that some adapters do not adapt takes the others only (their delta there is zero).
DoRA adapters cannot join several adapters yet: they are refused by name.
Re-exported by :mod:`minituner.lora`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minituner.lora.adapters import load_adapter, save_adapter
from minituner.lora.config import LoRAConfig
from minituner.lora.inject import install_lora_layers
from minituner.lora.layer import LoRALinear, check_rank, linear_features, lora_layers
from minituner.lora.targets import set_submodule

__all__ = [
    "BASE_ROW", "COMBINATION_TYPES", "LoRAAdapter", "MultiLoRALinear", "active_adapter",
    "adapter_names", "add_named_adapters", "add_weighted_adapter", "delete_adapter",
    "disable_adapter_layers", "enable_adapter_layers", "forward_with_adapters",
    "load_named_adapter", "multi_layers",
    "name_adapter", "save_named_adapter", "set_adapter", "use_adapter_rows",
]

BASE_ROW = "__base__"  # the row name that means "no adapter", as in PEFT
COMBINATION_TYPES = ("cat", "linear", "svd")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_adapter_name(name) -> str:
    """An adapter name: letters, digits, '_' and '-', not a name the module dict reserves."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' "
                         "(starting with a letter or digit)")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r} is reserved (a method of torch's ModuleDict)")
    return name


class LoRAAdapter(nn.Module):
    """One named adapter of one layer: ``scaling * dropout(x) A^T B^T``, and nothing of the base.

    ``config`` is the LoRAConfig of the file (or combination) it came from; ``order`` says when
    it was added to the model, so :func:`adapter_names` lists adapters in loading order.
    """

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 dropout: float = 0.0, config: LoRAConfig | None = None, order: int = 0):
        super().__init__()
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} "
                             "disagree on the rank")
        self.lora_A = nn.Parameter(lora_a.detach().clone(), requires_grad=False)
        self.lora_B = nn.Parameter(lora_b.detach().clone(), requires_grad=False)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.config = config
        self.order = order

    @property
    def r(self) -> int:
        """The adapter's rank at this layer."""
        return self.lora_A.shape[0]

    @classmethod
    def from_layer(cls, layer: LoRALinear, name: str, order: int = 0) -> LoRAAdapter:
        """The adapter part of a LoRA layer (a copy); a DoRA layer is refused, naming ``name``."""
        if getattr(layer, "use_dora", False) or hasattr(layer, "lora_magnitude_vector"):
            raise ValueError(f"adapter {name!r}: DoRA adapters cannot be loaded beside other "
                             "adapters yet; load it alone")
        return cls(layer.lora_A, layer.lora_B, layer.scaling, layer.dropout_p, layer.config,
                   order)

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * dropout(x) A^T B^T``: what this adapter adds to the base's output."""
        lora_in = self.dropout(x).to(self.lora_A.dtype)
        return self.scaling * ((lora_in @ self.lora_A.T) @ self.lora_B.T)

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` as an (out, in) matrix, whatever layout the base stores."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class MultiLoRALinear(nn.Module):
    """A frozen Linear-like base and named adapters; the active one (or none) is added to the
    base output, or, inside :func:`use_adapter_rows`, each batch row's own adapter."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.features = linear_features(base)  # (in, out)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_adapters: tuple | None = None  # per batch row, set by use_adapter_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.row_adapters is not None:
            return self._add_row_updates(x, out)
        if self.disabled or self.active not in self.adapters:
            return out
        return out + self.adapters[self.active].lora_update(x).to(out.dtype)

    def _add_row_updates(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out plus, for each adapter named in ``row_adapters``, its update on its own rows."""
        names = self.row_adapters
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries, the batch has "
                             f"{x.shape[0]} rows")
        for name in dict.fromkeys(names):
            if name not in self.adapters:  # "__base__", or an adapter that skips this layer
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            update = self.adapters[name].lora_update(x.index_select(0, rows))
            out = out.index_add(0, rows, update.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active!r}, disabled={self.disabled}"


# ----------------------------------------------------------------------------- the model's adapters


def multi_layers(model: nn.Module) -> list:
    """(module path, MultiLoRALinear) for every multi-adapter layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def _adapters_by_name(model: nn.Module) -> dict:
    """name -> {module path: LoRAAdapter}, in loading order."""
    found: dict = {}
    for path, layer in multi_layers(model):
        for name, adapter in layer.adapters.items():
            found.setdefault(name, {})[path] = adapter
    return dict(sorted(found.items(), key=lambda item: next(iter(item[1].values())).order))


def adapter_names(model: nn.Module) -> list:
    """The names of the adapters loaded on the model, in loading order."""
    return list(_adapters_by_name(model))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model's forward adds (None: none is active, or adapters are disabled)."""
    layers = multi_layers(model)
    if not layers or layers[0][1].disabled:
        return None
    return layers[0][1].active


def _known(model: nn.Module, name) -> str:
    """``name`` when it is loaded, else a one-line error naming it and the loaded ones."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"adapter {name!r}: not loaded (loaded: {', '.join(names) or 'none'})")
    return name


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter every forward adds (and enable adapters)."""
    _known(model, name)
    for _, layer in multi_layers(model):
        layer.active, layer.disabled = name, False


def disable_adapter_layers(model: nn.Module) -> None:
    """Run the base alone until :func:`enable_adapter_layers` (the active name is kept)."""
    if not multi_layers(model):
        raise ValueError("model has no named adapters (load some with load_named_adapter)")
    for _, layer in multi_layers(model):
        layer.disabled = True


def enable_adapter_layers(model: nn.Module) -> None:
    """Add the active adapter again after :func:`disable_adapter_layers`."""
    if not multi_layers(model):
        raise ValueError("model has no named adapters (load some with load_named_adapter)")
    for _, layer in multi_layers(model):
        layer.disabled = False


def _attach(model: nn.Module, name: str, adapters: Mapping) -> None:
    """Add ``adapters`` (module path -> LoRAAdapter) under ``name``, wrapping bare layers."""
    existing = multi_layers(model)
    active = existing[0][1].active if existing else name
    disabled = existing[0][1].disabled if existing else False
    for path, adapter in adapters.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, MultiLoRALinear):
            layer = MultiLoRALinear(layer)
            layer.active, layer.disabled = active, disabled
            set_submodule(model, path, layer)
        layer.adapters[name] = adapter


def _next_order(model: nn.Module) -> int:
    orders = [a.order for _, layer in multi_layers(model) for a in layer.adapters.values()]
    return max(orders, default=-1) + 1


def _check_new_name(model: nn.Module, name) -> str:
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r}: the name is already loaded (duplicate name)")
    if lora_layers(model):
        raise ValueError("model has unnamed LoRA layers; call name_adapter(model, NAME) first")
    return name


def name_adapter(model: nn.Module, name: str = "default") -> nn.Module:
    """Turn a model's LoRA layers (one unnamed adapter) into the named adapter ``name``."""
    check_adapter_name(name)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to name")
    if any(layer.merged for _, layer in layers):
        raise ValueError(f"adapter {name!r}: its layers are merged; call unmerge_lora first")
    if adapter_names(model):
        raise ValueError("model already has named adapters; load more with load_named_adapter")
    adapters = {path: LoRAAdapter.from_layer(layer, name) for path, layer in layers}
    for path, layer in layers:
        set_submodule(model, path, layer.base)
    _attach(model, name, adapters)
    return model


@contextmanager
def _bare_base(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model holds its bare base layers; its named adapters come back
    after (and any LoRA layers put in meanwhile are taken out again)."""
    saved = multi_layers(model)
    for path, layer in saved:
        set_submodule(model, path, layer.base)
    try:
        yield model
    finally:
        for path, layer in lora_layers(model):
            set_submodule(model, path, layer.base)
        for path, layer in saved:
            set_submodule(model, path, layer)


def load_named_adapter(model: nn.Module, directory, name: str,
                       strict: bool = True) -> nn.Module:
    """Load the PEFT-format adapter in ``directory`` as ``name``; the first one becomes active.

    The adapter is read onto the bare base with :func:`load_adapter`, so every check of a
    single adapter applies (``strict=False``: a base fingerprint mismatch only warns); errors
    name the adapter. The model's other adapters and its active adapter are left as they are.
    """
    _check_new_name(model, name)
    order = _next_order(model)
    with _bare_base(model):
        try:
            load_adapter(model, Path(directory), strict=strict, allow_modules_to_save=False)
        except ValueError as exc:
            raise ValueError(f"adapter {name!r}: {exc}") from None
        adapters = {path: LoRAAdapter.from_layer(layer, name, order)
                    for path, layer in lora_layers(model)}
    _attach(model, name, adapters)
    return model


def add_named_adapters(model: nn.Module, first: str, others: dict,
                       strict: bool = True) -> nn.Module:
    """Name the one adapter ``model`` already holds ``first``, then load each of ``others``
    ({name: directory}) beside it: the loaders of several adapters on a Mini-GPT or a
    transformers base share this."""
    name_adapter(model, first)
    for name, directory in others.items():
        load_named_adapter(model, directory, name, strict=strict)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left without adapters gets its bare base back. If it was
    active, the first remaining adapter becomes active (as in PEFT)."""
    _known(model, name)
    remaining = [n for n in adapter_names(model) if n != name]
    successor = remaining[0] if remaining else None
    for path, layer in multi_layers(model):
        if name in layer.adapters:
            del layer.adapters[name]
        if layer.active == name:
            layer.active = successor
        if not layer.adapters:
            set_submodule(model, path, layer.base)


# ----------------------------------------------------------------------------- mixed batches


@contextmanager
def use_adapter_rows(model: nn.Module, names: Sequence) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch goes through adapter ``names[i]`` (``"__base__"``:
    the base alone), whatever adapter is active or disabled."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter_names must be a non-empty list of names, got {names!r}")
    for name in dict.fromkeys(names):
        if name != BASE_ROW:
            _known(model, name)
    layers = [layer for _, layer in multi_layers(model)]
    for layer in layers:
        layer.row_adapters = tuple(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


def forward_with_adapters(model: nn.Module, x, adapter_names: Sequence, *args, **kwargs):
    """``model(x, ...)`` in one forward, row i through adapter ``adapter_names[i]``."""
    with use_adapter_rows(model, adapter_names):
        return model(x, *args, **kwargs)


# ----------------------------------------------------------------------------- combining


def _check_weights(names, weights) -> list:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a list of numbers, got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries for {len(names)} adapters")
    for name, weight in zip(names, weights, strict=True):
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight)):
            raise ValueError(f"adapter {name!r}: weight must be a finite number, got {weight!r}")
    return [float(w) for w in weights]


def _check_sources(model: nn.Module, names) -> dict:
    """name -> {path: LoRAAdapter} of the adapters to combine (known, listed once)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {names!r}")
    loaded = _adapters_by_name(model)
    seen = set()
    for name in names:
        _known(model, name)
        if name in seen:
            raise ValueError(f"adapter {name!r}: listed twice (duplicate name)")
        seen.add(name)
    return {name: loaded[name] for name in names}


def _check_equal_ranks(sources: dict) -> None:
    """'linear' adds A's and B's: every adapter needs one rank, the same at every layer."""
    first = next(iter(sources))
    rank = next(iter(sources[first].values())).r
    for name, layers in sources.items():
        for path, adapter in layers.items():
            if adapter.r != rank:
                raise ValueError(f"adapter {name!r}: rank {adapter.r} at {path} differs from "
                                 f"{first!r}'s rank {rank}; combination_type 'linear' needs "
                                 "equal ranks (use 'cat' or 'svd')")


def _combine_cat(parts: list) -> tuple:
    """A = [w_i s_i A_i], B = [B_i]: B A is exactly sum_i w_i s_i B_i A_i."""
    lora_a = torch.cat([weight * adapter.scaling * adapter.lora_A for adapter, weight in parts])
    lora_b = torch.cat([adapter.lora_B for adapter, _ in parts], dim=1)
    return lora_a, lora_b


def _combine_linear(parts: list) -> tuple:
    """With c_i = w_i s_i: A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i (PEFT's)."""
    lora_a = sum(math.copysign(math.sqrt(abs(w * a.scaling)), w * a.scaling) * a.lora_A
                 for a, w in parts)
    lora_b = sum(math.sqrt(abs(w * a.scaling)) * a.lora_B for a, w in parts)
    return lora_a, lora_b


def _combine_svd(parts: list, rank: int) -> tuple:
    """The best rank-``rank`` factors of D = sum w_i delta_i: B = U_r S_r, A = V_r^T."""
    dtype = parts[0][0].lora_A.dtype
    total = sum(weight * adapter.delta().double() for adapter, weight in parts)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = min(rank, s.numel())
    return vh[:rank].to(dtype), (u[:, :rank] * s[:rank]).to(dtype)


def add_weighted_adapter(model: nn.Module, adapters: Sequence, weights: Sequence,
                         new_name: str, combination_type: str = "svd",
                         rank: int | None = None) -> None:
    """Add ``new_name`` = the weighted combination of ``adapters`` (module docstring: "cat",
    "linear", "svd"); the active adapter is unchanged. ``rank``: the new rank ("svd" only)."""
    sources = _check_sources(model, adapters)
    weights = _check_weights(list(sources), weights)
    _check_new_name(model, new_name)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {list(COMBINATION_TYPES)}, "
                         f"got {combination_type!r}")
    if rank is not None and (combination_type != "svd" or check_rank(rank, "rank") == 0):
        raise ValueError(f"rank must be a positive int and is for combination_type 'svd', got "
                         f"{rank!r} with {combination_type!r}")
    if combination_type == "linear":
        _check_equal_ranks(sources)
    svd_rank = rank or max(a.r for layers in sources.values() for a in layers.values())
    first = next(iter(next(iter(sources.values())).values()))
    order = _next_order(model)
    combined = {}
    for path, layer in multi_layers(model):
        parts = [(layer.adapters[name], weight)
                 for name, weight in zip(sources, weights, strict=True)
                 if name in layer.adapters]
        if not parts:
            continue
        if combination_type == "cat":
            lora_a, lora_b = _combine_cat(parts)
        elif combination_type == "linear":
            lora_a, lora_b = _combine_linear(parts)
        else:
            lora_a, lora_b = _combine_svd(parts, svd_rank)
        dropout = getattr(parts[0][0].dropout, "p", 0.0)
        combined[path] = LoRAAdapter(lora_a, lora_b, 1.0, dropout, first.config, order)
    _attach(model, new_name, combined)


# ----------------------------------------------------------------------------- saving


def _saved_config(adapters: Mapping, seed_config: LoRAConfig | None) -> LoRAConfig:
    """A LoRAConfig whose r / alpha (and per-path patterns) give each layer its rank and scaling."""
    ranks = {path: a.r for path, a in adapters.items()}
    alphas = {path: a.scaling * a.r for path, a in adapters.items()}
    r = max(ranks.values())
    alpha = alphas[max(ranks, key=ranks.get)] or 1.0
    rank_pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    alpha_pattern = {re.escape(p): v for p, v in alphas.items() if v != alpha and v > 0}
    base = seed_config or LoRAConfig()
    return LoRAConfig(r=r, alpha=alpha, dropout=base.dropout, init=base.init, use_rslora=False,
                      target_modules=sorted(adapters), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, seed=base.seed)


def save_named_adapter(model: nn.Module, name: str, directory, **kwargs) -> Path:
    """Write adapter ``name`` as a PEFT-format folder (:func:`save_adapter`'s ``kwargs``); the
    base fingerprint is that of the model's base, so the file loads back on it."""
    _known(model, name)
    adapters = _adapters_by_name(model)[name]
    config = _saved_config(adapters, next(iter(adapters.values())).config)
    with _bare_base(model):
        layers = {}
        for path, adapter in adapters.items():
            layer = LoRALinear(model.get_submodule(path), r=adapter.r,
                               alpha=adapter.scaling * adapter.r or 1.0, freeze_base=False,
                               generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                layer.lora_A.copy_(adapter.lora_A)
                layer.lora_B.copy_(adapter.lora_B)
            layers[path] = layer
        install_lora_layers(model, layers, config)
        return save_adapter(model, directory, **kwargs)
