"""NF4 weights on disk and in state dicts, in the layout ``bnb.nn.Linear4bit`` uses.

Keys for a weight at ``<prefix>``: ``<prefix>weight`` (packed uint8, shape ((numel + 1) // 2, 1)),
``weight.absmax``, ``weight.quant_map`` and, with double quantization, ``weight.nested_absmax``
and ``weight.nested_quant_map``; plus ``weight.quant_state.bitsandbytes__nf4``, a uint8 tensor
holding JSON with quant_type, blocksize, dtype, shape (and nested_blocksize, nested_dtype,
nested_offset). The JSON bytes are what bitsandbytes 0.50.2 writes (``json.dumps`` defaults).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from minituner.quant.nf4 import NF4Weight, check_blocksize, check_dtype
from minituner.util.files import atomic_save_safetensors, load_safetensors

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
FILE_FORMAT = "minituner-nf4/1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(q: NF4Weight, prefix: str = "") -> dict:
    """State-dict entries for ``q`` as ``bnb.nn.Linear4bit`` writes them."""
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
            "shape": list(q.shape)}
    entries = {"weight": q.packed.view(-1, 1), "weight.absmax": q.absmax,
               "weight.quant_map": q.code}
    if q.double_quant:
        entries["weight.nested_absmax"] = q.nested_absmax
        entries["weight.nested_quant_map"] = q.nested_code
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                    nested_offset=q.offset)
    payload = json.dumps(meta).encode("utf-8")
    entries[QUANT_STATE_KEY] = torch.tensor(list(payload), dtype=torch.uint8)
    return {prefix + key: value for key, value in entries.items()}


def _read_meta(state_dict: Mapping, prefix: str) -> dict:
    key = prefix + QUANT_STATE_KEY
    if key not in state_dict:
        others = [k for k in state_dict if k.startswith(prefix + "weight.quant_state.")]
        if others:
            raise ValueError(f"{others[0]}: only nf4 quantization is supported")
        raise ValueError(f"state dict has no {key!r} entry (not a bitsandbytes 4-bit weight)")
    try:
        meta = json.loads(bytes(state_dict[key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}: not a JSON quant state ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: quant state must be a JSON object")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type must be 'nf4', got {meta.get('quant_type')!r}")
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{key}: missing field {field!r}")
    return meta


def _tensor(state_dict: Mapping, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"state dict is missing {key!r}")
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
    return value


def _meta_field(meta: dict, key: str, kind, where: str, default=None):
    """``meta[key]`` as ``kind`` (int or float), or a ValueError naming the field."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        what = "a number" if kind is float else "an int"
        raise ValueError(f"{where}: field {key!r} must be {what}, got {value!r}")
    return kind(value)


def from_bnb_state_dict(state_dict: Mapping, prefix: str = "") -> NF4Weight:
    """An :class:`NF4Weight` from the entries a ``bnb.nn.Linear4bit`` state dict holds."""
    meta = _read_meta(state_dict, prefix)
    where = f"{prefix}{QUANT_STATE_KEY}"
    shape = meta.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"{where}: field 'shape' must be a list of positive ints, got {shape!r}")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{prefix}{QUANT_STATE_KEY}: unknown dtype {meta['dtype']!r}")
    fields = {
        "packed": _tensor(state_dict, prefix + "weight").reshape(-1),
        "absmax": _tensor(state_dict, prefix + "weight.absmax"),
        "code": _tensor(state_dict, prefix + "weight.quant_map").float(),
        "shape": tuple(shape),
        "dtype": check_dtype(dtype),
        "blocksize": check_blocksize(meta["blocksize"]),
    }
    if fields["packed"].dtype != torch.uint8:  # bnb's quant_storage may be another dtype
        fields["packed"] = fields["packed"].contiguous().view(torch.uint8)
    if prefix + "weight.nested_absmax" in state_dict:
        fields.update(
            nested_absmax=_tensor(state_dict, prefix + "weight.nested_absmax").float(),
            nested_code=_tensor(state_dict, prefix + "weight.nested_quant_map").float(),
            offset=_meta_field(meta, "nested_offset", float, where),
            nested_blocksize=_meta_field(meta, "nested_blocksize", int, where, 256),
        )
    return NF4Weight(**fields)


def save_nf4(path, q: NF4Weight) -> Path:
    """Atomically write ``q`` to a safetensors file whose keys follow bitsandbytes' layout."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_bnb_state_dict(q).items()}
    return atomic_save_safetensors(path, tensors, metadata={"format": FILE_FORMAT})


def load_nf4(path) -> NF4Weight:
    """Read a weight written by :func:`save_nf4` (or any single-weight bitsandbytes file)."""
    try:
        return from_bnb_state_dict(load_safetensors(path))
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise ValueError(message) from None
