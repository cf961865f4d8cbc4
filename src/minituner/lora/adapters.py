"""Saving and loading LoRA adapters in Hugging Face PEFT's directory layout.

A directory holds ``adapter_model.safetensors`` (keys
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), and
for DoRA ``...lora_magnitude_vector`` (out,) with ``use_dora: true`` in the config, as PEFT)
and ``adapter_config.json`` (PEFT's LoraConfig fields plus a ``minituner`` section). PEFT reads
the directory (except rank 0, which PEFT rejects), and minituner reads PEFT-saved LoRA adapters.

Base fingerprint: sha256 over every tensor of the model's ``state_dict()`` except LoRA tensors
(parameters and persistent buffers), with the names the plain (unwrapped) model would use, in
sorted name order; for each tensor the hash takes ``name``, ``str(dtype)`` and the shape as
comma-separated ints, each followed by a NUL byte, then the tensor's raw bytes (C order, CPU).
It fingerprints the tensors as stored: an NF4-quantized base differs from its float source.

The hash changes when the base is copied to another dtype, so the adapter also stores per-tensor
statistics (``base_fingerprint.tensor_stats``, algorithm :data:`STATS_ALGORITHM`): for each float
tensor its L2 norm and a signed sum ``sum_i s_i w_i`` (``s_i = +-1`` from an integer hash of the
flat index: of its chunk of 2**20 and of its place in the chunk), both in float64; other tensors
by sha256 of their bytes. A bf16 or fp16 copy of the same base moves each value by at most
u = 2^-9 + 2^-11 (a bf16 and an fp16 rounding), so the norm moves by at most u times the norm,
and the signed sum (random signs against fixed rounding errors) by more than 8 u times the norm
with probability below 1e-13. Another base differs (its signed sum is off by about the norm); a
fine-tuned copy is told apart once its weights moved by a few times 8 u relative (a few
percent): smaller moves hide in the rounding.
An adapter with only the hash (written before the statistics existed) is checked by the hash
alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from minituner.lora.config import LoRAConfig
from minituner.lora.dora import DoRALinear
from minituner.lora.init import BASE_CHANGING_INITS, converted_alpha, converted_pair
from minituner.lora.inject import (
    install_lora_layers,
    is_lora_name,
    model_lora_config,
    set_model_lora_config,
)
from minituner.lora.layer import (
    LoRALinear,
    check_alpha,
    check_dropout,
    check_rank,
    linear_features,
    lora_layers,
    source_fan_in_fan_out,
)
from minituner.lora.merge import check_finite
from minituner.lora.saved_modules import (
    load_saved_modules,
    resolve_modules_to_save,
    saved_module_paths,
    saved_module_tensors,
)
from minituner.lora.targets import check_patterns, is_linear_like, pattern_value, suffix_matches
from minituner.util.files import (
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?:lora_(?P<part>[AB])\.weight"
                  r"|(?P<magnitude>lora_magnitude_vector))$")
# minituner init name <-> PEFT init_lora_weights. PEFT has no variance-1/r Gaussian; "gaussian"
# (std 1/r) is the nearest PEFT value, and the minituner section records the real init.
_PEFT_INIT = {"kaiming": True, "gaussian_std": "gaussian", "gaussian": "gaussian"}
_INIT_STD = {"gaussian": "1/sqrt(r)", "gaussian_std": "1/r", "kaiming": "uniform +-1/sqrt(in)"}
# PEFT options that change the math or add tensors minituner does not implement.
_UNSUPPORTED = ("lora_bias", "layer_replication",
                "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
                "use_qalora", "use_bdlora")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# Keys without a safe default: guessing r or lora_alpha silently changes the adapter's scale.
REQUIRED_KEYS = ("peft_type", "r", "lora_alpha")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the frozen base tensors under plain-model names (see the module docstring)."""
    named = _plain_tensors(model)
    digest = hashlib.sha256()
    for name in sorted(named):
        fingerprint_update(digest, name, named[name])
    return digest.hexdigest()


def fingerprint_update(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor to a base fingerprint's sha256 (callers go in sorted name order); lets
    a sharded loader hash a base one tensor at a time."""
    tensor = tensor.detach().cpu().contiguous()
    _fingerprint_header(digest, name, tensor.dtype, tensor.shape)
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes


def _fingerprint_header(digest, name: str, dtype: torch.dtype, shape) -> None:
    header = [name, str(dtype), ",".join(str(d) for d in shape)]
    digest.update(b"".join(part.encode() + b"\0" for part in header))


STATS_ALGORITHM = "l2-and-signed-sum-v1"
# Largest relative error of one value copied through bf16 and fp16 (half an ulp of each).
_COPY_ROUNDOFF = 2.0**-9 + 2.0**-11
_FP16_ABS_ERROR = 2.0**-25  # fp16 subnormals: absolute, not relative, rounding error
_SIGMAS = 8.0
_CHUNK = 1 << 20


def _plain_tensors(model: nn.Module) -> dict:
    """The model's non-LoRA state_dict tensors under the names the plain model would use."""
    wrapper_paths = {name for name, _ in lora_layers(model)}
    return {_plain_name(key, wrapper_paths): tensor
            for key, tensor in model.state_dict().items() if not is_lora_name(key)}


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values below 2**32."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@functools.lru_cache(maxsize=4)
def _chunk_signs(device: str) -> torch.Tensor:
    """+-1 (float64) for the positions inside one chunk, made once per device."""
    index = torch.arange(_CHUNK, dtype=torch.int64, device=device)
    return (_hash32(index) & 1).to(torch.float64) * 2 - 1


class _FloatStats:
    """The L2 norm and signed sum of a flat float tensor fed in consecutive pieces of any size:
    the same chunks, in the same order, as one pass over the whole tensor."""

    def __init__(self):
        self.squares, self.signed, self.number = 0.0, 0.0, 0
        self.pending: list = []

    def add(self, flat: torch.Tensor) -> None:
        """The next values (a flat tensor); every full chunk is counted now."""
        self.pending.append(flat)
        held = sum(p.numel() for p in self.pending)
        if held < _CHUNK:
            return
        values = torch.cat(self.pending) if len(self.pending) > 1 else flat
        full = held - held % _CHUNK
        for start in range(0, full, _CHUNK):
            self._count(values[start:start + _CHUNK])
        self.pending = [values[full:]] if full < held else []

    def _count(self, chunk: torch.Tensor) -> None:
        chunk = chunk.to(torch.float64)
        signs = _chunk_signs(str(chunk.device))
        chunk_sign = 1.0 if int(_hash32(torch.tensor(self.number + 0x9E37)) & 1) else -1.0
        self.squares += float(torch.dot(chunk, chunk))
        self.signed += chunk_sign * float(torch.dot(chunk, signs[:chunk.numel()]))
        self.number += 1

    def result(self) -> dict:
        """{"l2", "signed_sum"} of every value added (the last, partial chunk counted now)."""
        if self.pending:
            self._count(torch.cat(self.pending))
            self.pending = []
        return {"l2": math.sqrt(self.squares), "signed_sum": self.signed}


def _float_stats(tensor: torch.Tensor) -> dict:
    """L2 norm and signed sum; the sign of flat index i is chunk_sign(i // CHUNK) times the
    within-chunk sign of i % CHUNK (one sign vector per device, reused for every chunk)."""
    stats = _FloatStats()
    stats.add(tensor.detach().reshape(-1))
    return stats.result()


class StreamedTensor:
    """One float base tensor fed to the fingerprint and to its statistics a slice at a time
    (consecutive slices of its flattened values, in order): the same digest and entry as
    :func:`fingerprint_update` and :func:`tensor_stats` on the whole tensor, so a sharded
    loader need not hold it whole."""

    def __init__(self, digest, name: str, dtype: torch.dtype, shape):
        if not dtype.is_floating_point:
            raise ValueError(f"{name}: only float tensors are streamed, got {dtype}")
        _fingerprint_header(digest, name, dtype, shape)
        self.digest, self.dtype, self.shape = digest, dtype, list(shape)
        self.stats = _FloatStats()

    def update(self, values: torch.Tensor) -> None:
        """The next values of the tensor (any shape; taken flat, in order)."""
        flat = values.detach().cpu().contiguous().reshape(-1)
        self.digest.update(flat.view(torch.uint8).numpy())
        self.stats.add(flat)

    def entry(self) -> dict:
        """The tensor's :func:`tensor_stats` entry, once every value was fed."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "shape": self.shape,
                **self.stats.result()}


def base_tensor_stats(model: nn.Module) -> dict:
    """Per-tensor statistics of the frozen base that survive a dtype copy (module docstring)."""
    return {name: tensor_stats(tensor) for name, tensor in sorted(_plain_tensors(model).items())}


def tensor_stats(tensor: torch.Tensor) -> dict:
    """One tensor's entry of :func:`base_tensor_stats` (a sharded loader's one at a time)."""
    entry = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if tensor.is_floating_point():
        entry.update(_float_stats(tensor))
    else:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        entry["sha256"] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return entry


def _float_close(saved: dict, actual: dict) -> bool:
    """True when two float tensors' statistics agree within fp32/bf16/fp16 rounding.

    The dtype a model holds now does not say which dtypes its values passed through (a bf16
    checkpoint loaded in fp32 holds bf16-rounded values), so the bound allows the coarsest copy:
    one bf16 and one fp16 rounding of each value, plus fp16's subnormal step.
    """
    numel = math.prod(actual["shape"])
    norm = max(float(saved["l2"]), float(actual["l2"]))
    error = _COPY_ROUNDOFF * norm + _FP16_ABS_ERROR * math.sqrt(numel)
    slack = 1e-9 * norm + 1e-30
    return (abs(float(saved["l2"]) - float(actual["l2"])) <= error + slack
            and abs(float(saved["signed_sum"]) - float(actual["signed_sum"]))
            <= _SIGMAS * error + slack)


def stats_difference(saved: dict, actual: dict) -> str | None:
    """The first tensor whose statistics differ beyond dtype rounding (None: the same base)."""
    missing, extra = sorted(set(saved) - set(actual)), sorted(set(actual) - set(saved))
    if missing or extra:
        return f"tensors missing {missing[:3]}, unexpected {extra[:3]}"
    for name in sorted(saved):
        old, new = saved[name], actual[name]
        if list(old["shape"]) != new["shape"]:
            return f"{name} has shape {new['shape']}, the adapter's base had {old['shape']}"
        if "sha256" in new or "sha256" in old:
            if old.get("sha256") != new.get("sha256") or old["dtype"] != new["dtype"]:
                return f"{name} differs"
        elif not _float_close(old, new):
            return f"{name} differs beyond fp32/bf16/fp16 rounding"
    return None


def _plain_name(key: str, wrapper_paths: set) -> str:
    parts = key.split(".")
    kept = [
        part for i, part in enumerate(parts)
        if not (part == "base" and ".".join(parts[:i]) in wrapper_paths)
    ]
    return ".".join(kept)


def _base_config(model: nn.Module) -> dict | None:
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    if not callable(to_dict):
        return None
    return json.loads(json.dumps(to_dict(), default=str))


def _linear_paths(model: nn.Module) -> list:
    """Paths of the Linear-like layers as the plain model names them (wrappers count as one)."""
    wrappers = {name for name, _ in lora_layers(model)}
    return [
        name for name, module in model.named_modules()
        if name in wrappers or (is_linear_like(module) and name.rpartition(".")[0] not in wrappers)
    ]


def _peft_target_modules(model: nn.Module, requested, wrapped: list) -> list:
    """A target list PEFT resolves to exactly the wrapped modules (PEFT's list rule is a
    dotted-suffix match): the requested names, else leaf names, else full paths."""
    linears = _linear_paths(model)
    candidates = [sorted({name.rsplit(".", 1)[-1] for name in wrapped}), sorted(wrapped)]
    if isinstance(requested, (list, tuple)):
        candidates.insert(0, sorted(set(requested)))
    for targets in candidates:
        if [n for n in linears if any(suffix_matches(n, t) for t in targets)] == wrapped:
            return targets
    return sorted(wrapped)


def save_adapter(
    model: nn.Module, directory, base_model_name_or_path: str | None = None,
    extra: dict | None = None, fingerprint: str | None = None,
    initial: dict | None = None, tensor_stats: dict | None = None,
) -> Path:
    """Write the adapter (tensors + PEFT config + minituner section) to ``directory`` atomically.

    ``extra`` (JSON-able) is stored as ``minituner.base`` (e.g. how the base was loaded); when
    it names a base directory (``path``), that directory is also stored relative to the
    adapter folder (``relative_path``), so moving both together keeps the adapter working.
    ``fingerprint``: the base's :func:`base_fingerprint` when the caller already has it (it
    hashes every base tensor); computed here when not given.
    """
    layers = lora_layers(model)
    config = model_lora_config(model)
    if not layers or config is None:
        raise ValueError("model has no LoRA adapter to save (wrap it with apply_lora first)")
    if any(layer.merged for _, layer in layers):
        raise ValueError("model's adapters are merged into the base; call unmerge_lora first")
    settings = config.to_dict()
    directory = Path(directory)
    use_dora = _uses_dora(layers)
    init = settings["init"]
    converted = init in BASE_CHANGING_INITS
    if converted and (initial is None or fingerprint is None or tensor_stats is None):
        raise ValueError(f"init {init!r} changed the base: saving needs initial= (the adapter "
                         "at initialisation), fingerprint= and tensor_stats= of the original base")
    saved_paths = saved_module_paths(model)
    if saved_paths and (fingerprint is None or tensor_stats is None):
        raise ValueError("modules_to_save changed base modules: saving needs fingerprint= and "
                         "tensor_stats= of the base before training")
    tensors = _adapter_tensors(layers, initial if converted else None, use_dora)
    tensors.update(saved_module_tensors(model, KEY_PREFIX))
    wrapped = [name for name, _ in layers]
    section = {
        "format_version": FORMAT_VERSION,
        "init": init,
        "init_a_std": _INIT_STD.get(init, "not random: " + init),
        "target_modules_requested": settings["target_modules"],
        "seed": settings.get("seed"),
        "base_fingerprint": {
            "algorithm": "sha256",
            "covers": "state_dict tensors except lora_*, plain-model names, sorted; "
                      "name, dtype, shape (NUL-terminated) then raw bytes per tensor",
            "value": fingerprint if fingerprint is not None else base_fingerprint(model),
            "tensor_stats": {"algorithm": STATS_ALGORITHM,
                             "covers": "the same tensors; floats: L2 norm and signed sum in "
                                       "float64, others: sha256 of the bytes",
                             "tensors": tensor_stats if tensor_stats is not None
                             else base_tensor_stats(model)},
        },
        "base_config": _base_config(model),
    }
    if extra is not None:
        section["base"] = _with_relative_path(extra, directory)
    if init == "gaussian":
        section["init_lora_weights_note"] = (
            "A was drawn with variance 1/r (std 1/sqrt(r)); PEFT has no such option and its "
            "'gaussian' means std 1/r. Loading trained weights does not depend on the init."
        )
    if any(layer.r == 0 for _, layer in layers):
        section["peft_loadable"] = False
        section["note"] = "rank 0 adapter: PEFT cannot load it (PEFT rejects r <= 0)"
    if converted:
        settings = _converted_settings(settings)
        section["converted"] = {
            "from_init": init, "trained_rank": config.r,
            "note": "saved as a plain LoRA adapter on the original base: the trained adapter "
                    "minus its initial value, [B_t, -B_0] [A_t; A_0] (rank 2r, alpha doubled)"}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": settings["r"], "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
        "target_modules": _peft_target_modules(model, settings["target_modules"], wrapped),
        "bias": "none", "use_rslora": settings["use_rslora"],
        "fan_in_fan_out": any(source_fan_in_fan_out(layer.base) for _, layer in layers),
        "use_dora": use_dora, "init_lora_weights": _PEFT_INIT.get(init, True),
        "modules_to_save": saved_paths or None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "rank_pattern": settings["rank_pattern"], "alpha_pattern": settings["alpha_pattern"],
        "revision": None, "layers_to_transform": None, "layers_pattern": None,
        "minituner": section,
    }
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def _uses_dora(layers: list) -> bool:
    """True when every LoRA layer is a DoRA layer; a mix has no PEFT config and is refused."""
    dora = {isinstance(layer, DoRALinear) for _, layer in layers}
    if len(dora) > 1:
        raise ValueError("model mixes DoRA and plain LoRA layers; an adapter file holds one kind")
    return dora.pop()


def _adapter_tensors(layers: list, initial: dict | None, use_dora: bool = False) -> dict:
    """PEFT-keyed A and B of every layer (and DoRA's magnitudes); with ``initial``, the
    converted rank-2r pairs."""
    tensors = {}
    for name, layer in layers:
        lora_a, lora_b = layer.lora_A.detach().cpu(), layer.lora_B.detach().cpu()
        if initial is not None:
            missing = [k for k in (f"{name}.lora_A", f"{name}.lora_B") if k not in initial]
            if missing:
                raise ValueError(f"initial adapter has no {missing[0]!r}")
            lora_a, lora_b = converted_pair(lora_a, lora_b, initial[f"{name}.lora_A"].cpu(),
                                            initial[f"{name}.lora_B"].cpu())
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = lora_b.contiguous()
        if use_dora:
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = (
                layer.lora_magnitude_vector.detach().cpu())
    return tensors


def _converted_settings(settings: dict) -> dict:
    """Ranks doubled and alphas raised so each layer's scaling stays what it trained with."""
    rslora = settings["use_rslora"]
    return {**settings, "r": 2 * settings["r"],
            "alpha": converted_alpha(settings["alpha"], rslora),
            "rank_pattern": {k: 2 * v for k, v in settings["rank_pattern"].items()},
            "alpha_pattern": {k: converted_alpha(v, rslora)
                              for k, v in settings["alpha_pattern"].items()}}


def _with_relative_path(extra, directory: Path):
    """``extra`` plus ``relative_path``: its ``path`` seen from the adapter folder."""
    path = extra.get("path") if isinstance(extra, dict) else None
    if not isinstance(path, str) or not path:
        return extra
    try:
        relative = os.path.relpath(Path(path).resolve(), directory.resolve())
    except ValueError:  # another drive (Windows): only the absolute path can be kept
        return extra
    return {**extra, "relative_path": Path(relative).as_posix()}


def _parse_config(config: dict, path: Path) -> dict:
    """Validated LoRA settings from an adapter_config.json (PEFT's or minituner's)."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: adapter config must be a JSON object")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"{path}: required key {key!r} is missing")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise ValueError(f"{path}: {field}={config[field]!r} is not supported by minituner")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    section = config.get("minituner")
    try:
        settings = {
            "r": check_rank(config["r"], "r"),
            "alpha": check_alpha(config["lora_alpha"], "lora_alpha"),
            "dropout": check_dropout(config.get("lora_dropout", 0.0), "lora_dropout"),
            "use_rslora": _check_bool(config.get("use_rslora", False), "use_rslora"),
            "use_dora": _check_bool(config.get("use_dora", False), "use_dora"),
            "fan_in_fan_out": _check_bool(config.get("fan_in_fan_out", False), "fan_in_fan_out"),
            "rank_pattern": check_patterns(config.get("rank_pattern"), "rank_pattern", check_rank),
            "alpha_pattern": check_patterns(
                config.get("alpha_pattern"), "alpha_pattern", check_alpha),
            "init": _init_name(config.get("init_lora_weights", True), section),
        }
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    settings["target_modules"] = config.get("target_modules")
    settings["modules_to_save"] = _modules_to_save_names(config.get("modules_to_save"), path)
    settings["fingerprint"], settings["tensor_stats"] = None, None
    if isinstance(section, dict):
        version = section.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{path}: minituner.format_version {version!r} is not supported")
        requested = section.get("target_modules_requested", config.get("target_modules"))
        settings["target_modules"] = requested
        record = section.get("base_fingerprint") or {}
        if not isinstance(record, dict):
            raise ValueError(f"{path}: minituner.base_fingerprint must be an object")
        settings["fingerprint"] = record.get("value")
        settings["tensor_stats"] = _stats_of(record.get("tensor_stats"), path)
    return settings


def _modules_to_save_names(value, path: Path) -> list:
    """The adapter's modules_to_save names (none: an empty list)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{path}: modules_to_save must be a list of module names, got {value!r}")
    return value


def _split_saved(tensors: dict, names: list) -> tuple:
    """(LoRA tensors, {module path: {key: tensor}} of the modules trained in full): a key
    whose module path ends with a modules_to_save name belongs to that module."""
    lora, saved = {}, {}
    for key, tensor in tensors.items():
        rest = key.removeprefix(KEY_PREFIX)
        parts = rest.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if any(suffix_matches(".".join(parts[:i]), n) for n in names)), None)
        if owner is None or not key.startswith(KEY_PREFIX):
            lora[key] = tensor
        else:
            saved.setdefault(owner, {})[rest[len(owner) + 1:]] = tensor
    return lora, saved


def _check_saved(model: nn.Module, saved: dict, names: list, path: Path) -> list:
    """The module paths of the file's modules_to_save, after checking every tensor fits."""
    try:
        paths = resolve_modules_to_save(model, names) if names else []
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if sorted(saved) != sorted(paths):
        raise ValueError(f"{path}: modules_to_save {names} select {paths} but the file holds "
                         f"tensors for {sorted(saved)}")
    for module in paths:
        expected = model.get_submodule(module).state_dict()
        if set(expected) != set(saved[module]):
            raise ValueError(f"{path}: {module} holds {sorted(saved[module])}, the model's module "
                             f"has {sorted(expected)}")
        for key, tensor in saved[module].items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path}: {module}.{key} has shape {tuple(tensor.shape)}, the "
                                 f"model's is {tuple(expected[key].shape)}")
    return paths


def _stats_of(value, path: Path) -> dict | None:
    """The recorded per-tensor statistics (None when absent), after checking their form."""
    if not isinstance(value, dict) or value.get("algorithm") != STATS_ALGORITHM:
        return None  # absent, or an algorithm this minituner does not know: the hash only
    tensors = value.get("tensors")
    if not isinstance(tensors, dict) or not all(map(_stats_entry_ok, tensors.values())):
        raise ValueError(f"{path}: minituner.base_fingerprint.tensor_stats is malformed")
    return tensors


def _stats_entry_ok(entry) -> bool:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        return False
    return "sha256" in entry or (number(entry.get("l2")) and number(entry.get("signed_sum")))


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _init_name(peft_value, section) -> str:
    if isinstance(section, dict) and section.get("init") in _INIT_STD:
        return section["init"]
    if isinstance(section, dict) and section.get("init") in BASE_CHANGING_INITS:
        if not isinstance(section.get("converted"), dict):
            raise ValueError(f"init {section['init']!r} changes the base weights and the "
                             "adapter was not converted to the original base")
        return "kaiming"  # a plain LoRA adapter now; the trained tensors are what count
    if isinstance(peft_value, str):
        if peft_value.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(f"init_lora_weights={peft_value!r} changes the base weights")
        return "gaussian_std" if peft_value == "gaussian" else "kaiming"
    return "kaiming"


def _parse_tensors(tensors: dict, path: Path, use_dora: bool = False) -> dict:
    """{module path: (A, B)}, or (A, B, magnitude) with ``use_dora``, from PEFT keys; anything
    else is an error naming the key."""
    pairs: dict = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} (expected {KEY_PREFIX}"
                             "<module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector)")
        part, ndim = ("M", 1) if match["magnitude"] else (match["part"], 2)
        if part == "M" and not use_dora:
            raise ValueError(f"{path}: {key} is a DoRA magnitude but the config has "
                             "use_dora=false")
        if tensor.ndim != ndim or not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} must be a {ndim}-D float tensor, "
                             f"got {tuple(tensor.shape)}")
        pairs.setdefault(match["path"], {})[part] = tensor
    for module, parts in pairs.items():
        if not {"A", "B"} <= set(parts):
            raise ValueError(f"{path}: {module} has lora_{''.join(sorted(set(parts) - {'M'}))} "
                             "but not both A and B")
        if use_dora and "M" not in parts:
            raise ValueError(f"{path}: {module} has no lora_magnitude_vector but the config has "
                             "use_dora=true")
        if parts["A"].shape[0] != parts["B"].shape[1]:
            raise ValueError(f"{path}: {module} lora_A {tuple(parts['A'].shape)} and lora_B "
                             f"{tuple(parts['B'].shape)} disagree on the rank")
        if use_dora and parts["M"].shape[0] != parts["B"].shape[0]:
            raise ValueError(f"{path}: {module} lora_magnitude_vector {tuple(parts['M'].shape)} "
                             f"does not match lora_B {tuple(parts['B'].shape)}'s out dimension")
    order = ("A", "B", "M") if use_dora else ("A", "B")
    return {module: tuple(parts[p] for p in order) for module, parts in pairs.items()}


def _check_shapes(path: Path, module: str, layer_shape: tuple, pair: tuple, settings: dict) -> int:
    """The rank the file gives ``module``, after checking it against the config and the model."""
    fan_in, fan_out = layer_shape
    lora_a, lora_b = pair[:2]
    rank = lora_a.shape[0]
    expected = pattern_value(settings["rank_pattern"], module, settings["r"])
    if rank != expected:
        raise ValueError(f"{path}: {module} has rank {rank}, the config says {expected}")
    if tuple(lora_a.shape) != (rank, fan_in) or tuple(lora_b.shape) != (fan_out, rank):
        raise ValueError(
            f"{path}: {module} lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not "
            f"fit the model's layer (in {fan_in}, out {fan_out})"
        )
    return rank


def _plan_plain(model: nn.Module, pairs: dict, settings: dict, path: Path) -> dict:
    """New, unattached LoRA layers holding the file's tensors, one per adapted module."""
    module_names = dict(model.named_modules())
    layers = {}
    for module, pair in pairs.items():
        base = module_names.get(module)
        if base is None or not is_linear_like(base):
            raise ValueError(f"{path}: the model has no Linear named {module!r}")
        rank = _check_shapes(path, module, linear_features(base), pair, settings)
        layer_class = DoRALinear if settings["use_dora"] else LoRALinear
        layer = layer_class(
            base, r=rank, alpha=pattern_value(settings["alpha_pattern"], module, settings["alpha"]),
            dropout=settings["dropout"], init=settings["init"], use_rslora=settings["use_rslora"],
            freeze_base=False, generator=torch.Generator().manual_seed(0),
        )
        _copy_tensors(layer, pair)
        layers[module] = layer
    return layers


@torch.no_grad()
def _copy_tensors(layer: LoRALinear, tensors: tuple) -> None:
    """Copy (A, B) or (A, B, magnitude) from the file into the layer."""
    layer.lora_A.copy_(tensors[0])
    layer.lora_B.copy_(tensors[1])
    if len(tensors) == 3:
        layer.lora_magnitude_vector.copy_(tensors[2])


def _check_wrapped(model: nn.Module, pairs: dict, settings: dict, path: Path) -> dict:
    """The model's LoRA layers by path, after checking they match the file one to one."""
    layers = dict(lora_layers(model))
    if any(layer.merged for layer in layers.values()):
        raise ValueError("model's adapters are merged into the base; call unmerge_lora first")
    missing, unexpected = sorted(set(layers) - set(pairs)), sorted(set(pairs) - set(layers))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter modules differ from the model's LoRA layers: "
                         f"missing in file {missing}, not in model {unexpected}")
    for module, layer in layers.items():
        if isinstance(layer, DoRALinear) != settings["use_dora"]:
            kind = "DoRA" if isinstance(layer, DoRALinear) else "plain LoRA"
            raise ValueError(f"{path}: {module} is a {kind} layer but the adapter has "
                             f"use_dora={str(settings['use_dora']).lower()}")
        features = (layer.in_features, layer.out_features)
        rank = _check_shapes(path, module, features, pairs[module], settings)
        if rank != layer.r:
            raise ValueError(f"{path}: {module} has rank {rank}, the model's layer has {layer.r}")
    return layers


def _check_layout(model: nn.Module, modules: list, settings: dict, path: Path) -> None:
    """fan_in_fan_out=True needs at least one adapted layer stored (in, out), as in GPT-2."""
    if not settings["fan_in_fan_out"]:
        return  # like PEFT, a Conv1D layer is read in its own layout whatever the flag says
    found = dict(model.named_modules())
    bases = [getattr(found[m], "base", found[m]) for m in modules if m in found]
    if not any(source_fan_in_fan_out(base) for base in bases):
        raise ValueError(f"{path}: fan_in_fan_out=True but none of the adapted layers is stored "
                         "(in, out) like GPT-2's Conv1D (adapter for another architecture?)")


def _check_fingerprint(model: nn.Module, settings: dict, path: Path, strict: bool) -> None:
    saved = settings["fingerprint"]
    if saved is None:
        warnings.warn(f"{path}: the adapter records no minituner.base_fingerprint (a PEFT "
                      "adapter?), so its base could not be checked", UserWarning, stacklevel=3)
        return
    actual = base_fingerprint(model)
    if actual == saved:
        return
    detail = ""
    if settings["tensor_stats"] is not None:
        difference = stats_difference(settings["tensor_stats"], base_tensor_stats(model))
        if difference is None:
            return  # the same base in another dtype
        detail = f" ({difference})"
    message = (f"{path}: base model fingerprint mismatch: the adapter was trained on base "
               f"{str(saved)[:12]}..., this model is {actual[:12]}...{detail}")
    if strict:
        raise ValueError(message + "; pass --no-verify-base (strict=False) to load anyway")
    warnings.warn(message, UserWarning, stacklevel=3)


def verify_adapter_base(model: nn.Module, directory, strict: bool = True) -> None:
    """Check ``model`` against the base fingerprint of the adapter in ``directory`` (a model
    that must change before the adapter fits, say a grown vocabulary, is checked first)."""
    config_path = Path(directory) / CONFIG_NAME
    settings = _parse_config(read_json(config_path, "adapter config"), config_path)
    _check_fingerprint(model, settings, config_path, strict)


def load_adapter(model: nn.Module, directory, strict: bool = True,
                 allow_modules_to_save: bool = True, check_base: bool = True) -> nn.Module:
    """Load an adapter directory into ``model`` (wrapping a plain model first); returns it.

    Every key, shape, value (NaN/inf is refused naming the tensor) and the base fingerprint are
    checked before the model is touched.
    ``strict=False`` turns only a fingerprint mismatch into a warning. Loading into an already
    wrapped model also takes the file's alpha and use_rslora. Modules the adapter trained in full
    (``modules_to_save``) become trainable copies in the model (a plain model only);
    ``allow_modules_to_save=False`` refuses such an adapter. ``check_base=False`` skips the
    fingerprint check (done before with :func:`verify_adapter_base`).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    settings = _parse_config(read_json(config_path, "adapter config"), config_path)
    tensors = load_safetensors(weights_path)
    check_finite(sorted(tensors.items()), str(weights_path))
    tensors, saved = _split_saved(tensors, settings["modules_to_save"])
    if saved and not allow_modules_to_save:
        raise ValueError(f"{config_path}: the adapter trains modules in full (modules_to_save "
                         f"{sorted(saved)}): several named adapters on one base do not support "
                         "modules_to_save")
    pairs = _parse_tensors(tensors, weights_path, settings["use_dora"])
    if not pairs:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")
    _check_layout(model, sorted(pairs), settings, config_path)
    wrapped = bool(lora_layers(model))
    if wrapped:
        layers = _check_wrapped(model, pairs, settings, weights_path)
    else:
        layers = _plan_plain(model, pairs, settings, weights_path)
    if wrapped and (saved or saved_module_paths(model)):
        raise ValueError(f"{config_path}: modules_to_save adapters load into a plain model only")
    saved_paths = _check_saved(model, saved, settings["modules_to_save"], weights_path)
    if check_base:
        _check_fingerprint(model, settings, config_path, strict)
    if not wrapped:
        config = LoRAConfig(**{key: settings[key] for key in
                               ("r", "alpha", "dropout", "init", "use_rslora", "use_dora",
                                "target_modules", "rank_pattern", "alpha_pattern")})
        install_lora_layers(model, layers, config)
        if saved_paths:
            load_saved_modules(model, saved_paths, saved)
        return model
    with torch.no_grad():
        for module, layer in layers.items():
            _copy_tensors(layer, pairs[module])
            layer.set_alpha(pattern_value(settings["alpha_pattern"], module, settings["alpha"]),
                            settings["use_rslora"])
    updates = {key: settings[key] for key in
               ("r", "alpha", "use_rslora", "rank_pattern", "alpha_pattern")}
    set_model_lora_config(model, replace(model_lora_config(model) or LoRAConfig(), **updates))
    return model
