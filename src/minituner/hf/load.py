"""Quantize-while-loading: a transformers model built with its weights read layer by layer.

The model is first built with every parameter on the meta device (no memory; buffers such as
rotary tables are real). Then tensors are read one at a time from the safetensors file(s) with
``safe_open``: a targeted Linear's weight is turned into a
:class:`minituner.quant.qlora.QuantizedLinear`
as soon as it is read (GPT-2's Conv1D weight, stored (in, out), is transposed to (out, in)
first, as bitsandbytes stores it), so the full-precision model is never in memory whole: the
peak is the quantized model plus the float embeddings plus one float weight.

A checkpoint already quantized by bitsandbytes (``save_pretrained`` of a model loaded with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``) is read the same way:
its packed NF4 weights become QuantizedLinear layers as they are, byte for byte.

Each layer declares where it came from in its ``origin`` (a Conv1D's (in, out) layout, a
bitsandbytes checkpoint); :func:`minituner.quant.qlora.quantization_summary` reads the model's
settings back from the layers.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.models import (
    fuse_activations,
    hf_dir,
    hf_targets,
    load_hf_model,
    read_hf_config,
)
from minituner.lora.base import is_fan_in_fan_out
from minituner.lora.targets import ALL_LINEAR, set_submodule
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.kernels import lookup_tables
from minituner.quant.nf4 import NF4Weight, check_blocksize, quantize_nf4
from minituner.quant.nf4_io import QUANT_STATE_KEY
from minituner.quant.qlora import (
    DequantBuffer,
    QuantizedLinear,
    QuantizedOrigin,
    parse_quant_scheme,
)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextmanager
def params_on_meta():
    """Inside the block, every parameter a module registers is created on the meta device."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def inside_model_dir(directory: Path, name, where: Path) -> Path:
    """``directory / name`` for a file name read from ``where`` (an index or config), refused
    unless it is a relative path that stays inside the model folder (no ``..``, no symlink out)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: file name {name!r} is not a non-empty string")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{where}: file {name!r} is outside the model folder {directory}")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{where}: file {name!r} resolves outside the model folder {directory}")
    return path


class TensorSource:
    """Every tensor of a model directory's safetensors file(s), read one at a time on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / WEIGHTS_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index ({exc})") from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: weight_map must be an object of tensor -> file")
            self.file_of = {key: inside_model_dir(self.directory, name, index)
                            for key, name in weight_map.items()}
        elif single.is_file():
            self.file_of = {key: single for key in self._keys(single)}
        else:
            raise ValueError(f"{self.directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (QLoRA "
                             "loading reads safetensors checkpoints only)")

    @staticmethod
    def _keys(path: Path) -> list:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list:
        """Every tensor name, sorted."""
        return sorted(self.file_of)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its file now (a CPU copy).

        The file is opened for this tensor alone: safetensors maps the file into memory, and a
        mapping kept open would leave every page read so far resident.
        """
        with self._open(key) as handle:
            return handle.get_tensor(key)

    def shape(self, key: str) -> list:
        """One tensor's shape, from its file's header (nothing read)."""
        with self._open(key) as handle:
            return list(handle.get_slice(key).get_shape())

    def rows(self, key: str, first: int, stop: int) -> torch.Tensor:
        """Rows ``first:stop`` of one tensor, read from its file now (only those bytes)."""
        with self._open(key) as handle:
            return handle.get_slice(key)[first:stop]

    def _open(self, key: str):
        """The safetensors file holding ``key``, opened for one read."""
        from safetensors import safe_open

        path = self.file_of.get(key)
        if path is None:
            raise ValueError(f"{self.directory}: checkpoint has no tensor {key!r}")
        return safe_open(str(path), framework="pt")


def checkpoint_name(source: TensorSource, name: str, prefix: str) -> str | None:
    """The checkpoint key of a model tensor: as is, or with/without the base-model prefix."""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if c in source), None)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if is_param:
        parent._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        parent._buffers[leaf] = tensor


def _float(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_quantized_hf_model(
    path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    double_quant: bool = True,
    target_modules=ALL_LINEAR,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A transformers causal LM whose targeted Linears are NF4 QuantizedLinear layers.

    Quantizes while loading (see the module docstring); a bitsandbytes 4-bit checkpoint is read
    as stored. Other tensors are loaded in ``compute_dtype``, which is also the dtype the NF4
    weights dequantize to. The model is returned in eval mode with every parameter frozen;
    :func:`minituner.quant.qlora.quantization_summary` tells how it is stored.
    """
    from transformers import AutoModelForCausalLM

    check_blocksize(blocksize)
    config = read_hf_config(path)  # refuses an unsupported architecture
    source = TensorSource(hf_dir(path))
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    prefix = getattr(model, "base_model_prefix", "")
    prequantized = {
        key[: -len(QUANT_STATE_KEY) - 1] for key in source.keys() if key.endswith(QUANT_STATE_KEY)
    }
    targets = _quantized_paths(model, source, prefix, prequantized, target_modules)
    buffer = DequantBuffer()
    for name in targets:
        module = model.get_submodule(name)
        has_bias = getattr(module, "bias", None) is not None
        layer = _quantized_layer(source, name, prefix, module, compute_dtype, blocksize,
                                 double_quant, buffer, has_bias)
        set_submodule(model, name, layer)
    _load_remaining(model, source, prefix, compute_dtype)
    fuse_activations(model)
    model.requires_grad_(False)
    return model.to(device).eval()


def _quantized_paths(model, source, prefix, prequantized, target_modules) -> list:
    """Module paths to hold in NF4: the bitsandbytes-quantized ones, or the targets."""
    if not prequantized:
        return hf_targets(model, target_modules)
    paths = [name for name, _ in model.named_modules()
             if checkpoint_name(source, f"{name}.{QUANT_STATE_KEY}", prefix)]
    if len(paths) != len(prequantized):
        raise ValueError(f"{source.directory}: quantized tensors {sorted(prequantized)[:3]} "
                         "do not all match modules of the model")
    return paths


def _quantized_layer(source, name, prefix, module, compute_dtype, blocksize, double_quant,
                     buffer, has_bias):
    bias_key = checkpoint_name(source, f"{name}.bias", prefix) if has_bias else None
    bias = _float(source.get(bias_key), compute_dtype) if bias_key else None
    if has_bias and bias is None:
        raise ValueError(f"{source.directory}: checkpoint has no {name}.bias")
    state_key = checkpoint_name(source, f"{name}.{QUANT_STATE_KEY}", prefix)
    if state_key is not None:  # stored by bitsandbytes: take the bytes as they are
        stem = state_key[: -len(QUANT_STATE_KEY)]  # "<module path>."
        state = {key: source.get(key) for key in source.keys()
                 if key.startswith(stem + "weight")}
        return QuantizedLinear.from_bnb_state_dict(state, stem, bias=bias,
                                                   compute_dtype=compute_dtype, buffer=buffer,
                                                   fan_in_fan_out=is_fan_in_fan_out(module))
    weight_key = checkpoint_name(source, f"{name}.weight", prefix)
    if weight_key is None:
        raise ValueError(f"{source.directory}: checkpoint has no {name}.weight")
    return nf4_layer(source.get(weight_key), bias, is_fan_in_fan_out(module), compute_dtype,
                     blocksize, double_quant, buffer)


def nf4_layer(weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool,
              compute_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
              buffer=None) -> nn.Module:
    """A QuantizedLinear from a float weight; a Conv1D weight (in, out) is transposed first."""
    if fan_in_fan_out:
        weight = weight.t()  # Conv1D stores (in, out); NF4 blocks run over (out, in) rows
    weight = weight.detach().to(compute_dtype).contiguous()
    quantized = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    return QuantizedLinear(quantized, bias, compute_dtype=compute_dtype, buffer=buffer,
                           origin=QuantizedOrigin(fan_in_fan_out=fan_in_fan_out))


def nf4_shell(module: nn.Module, compute_dtype: torch.dtype, blocksize: int = 64,
              double_quant: bool = True, buffer=None) -> nn.Module:
    """A QuantizedLinear for ``module`` (a Linear or Conv1D, any device) whose codes, scales
    and bias are meta tensors of the shapes :func:`nf4_layer` gives: a layer to shard before
    its values exist (a sharded load fills it; its ``offset`` is set then)."""
    fan_in_fan_out = is_fan_in_fan_out(module)
    shape = tuple(module.weight.shape[::-1] if fan_in_fan_out else module.weight.shape)
    numel = shape[0] * shape[1]
    blocks = -(-numel // blocksize)
    meta = {"device": "meta"}
    fields = {"packed": torch.empty((numel + 1) // 2, dtype=torch.uint8, **meta),
              "shape": shape, "dtype": compute_dtype, "blocksize": blocksize,
              "code": lookup_tables("cpu")["code"]}
    if double_quant:
        fields.update(absmax=torch.empty(blocks, dtype=torch.uint8, **meta), offset=0.0,
                      nested_absmax=torch.empty(-(-blocks // NF4Weight.nested_blocksize),
                                                dtype=torch.float32, **meta),
                      nested_code=lookup_tables("cpu")["nested_code"].clone())
    else:
        fields["absmax"] = torch.empty(blocks, dtype=torch.float32, **meta)
    bias = None if getattr(module, "bias", None) is None else \
        torch.empty(shape[0], dtype=compute_dtype, **meta)
    return QuantizedLinear(NF4Weight(**fields), bias, compute_dtype=compute_dtype, buffer=buffer,
                           origin=QuantizedOrigin(fan_in_fan_out=fan_in_fan_out))


@torch.no_grad()
def quantize_loaded_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                          blocksize: int = 64, double_quant: bool = True,
                          target_modules=ALL_LINEAR) -> nn.Module:
    """Replace the targeted Linear / Conv1D layers of a float model in memory by NF4 layers."""
    buffer = DequantBuffer()
    names = hf_targets(model, target_modules)
    for name in names:
        module = model.get_submodule(name)
        bias = None if module.bias is None else module.bias.detach().to(compute_dtype)
        set_submodule(model, name, nf4_layer(module.weight, bias, is_fan_in_fan_out(module),
                                             compute_dtype, blocksize, double_quant, buffer))
    return model


def _load_remaining(model: nn.Module, source: TensorSource, prefix: str,
                    dtype: torch.dtype) -> None:
    """Fill every parameter still on meta (and persistent buffers) from the checkpoint, then tie."""
    params = {name: p for name, p in model.named_parameters(remove_duplicate=True)}
    for name, param in params.items():
        if not param.is_meta:
            continue
        key = checkpoint_name(source, name, prefix)
        if key is not None:
            _set_tensor(model, name, _float(source.get(key), dtype), is_param=True)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, buffer in model.named_buffers():
        key = checkpoint_name(source, name, prefix)
        if key is not None and name.rpartition(".")[0] not in quantized:
            _set_tensor(model, name, _float(source.get(key), buffer.dtype), is_param=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ValueError(f"{source.directory}: checkpoint lacks tensors {still[:5]}"
                         + (f" and {len(still) - 5} more" if len(still) > 5 else ""))


def base_record(path: str | os.PathLike, method: str, compute_dtype: torch.dtype,
                quant_scheme: str = DEFAULT_QUANT_SCHEME) -> dict:
    """How a base was loaded (stored with an adapter, so merge and eval load the same base)."""
    if method not in ("lora", "qlora"):
        raise ValueError(f"--method must be lora or qlora for transformers models, got {method!r}")
    record = {"kind": "transformers", "path": str(Path(hf_dir(path)).resolve()),
              "method": method, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    if method == "qlora":
        record["quant_scheme"] = quant_scheme
    return record


def recorded_base_dir(record: dict, adapter_dir: str | os.PathLike) -> str:
    """The base directory an adapter's record names: its ``relative_path`` seen from the
    adapter folder when that is a model folder (both were moved together), else ``path``."""
    relative = record.get("relative_path")
    if isinstance(relative, str) and relative:
        moved = Path(adapter_dir) / relative
        if (moved / "config.json").is_file():
            return str(moved.resolve())
    path = record.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{adapter_dir}: minituner.base.path is {path!r}, not a directory")
    return path


def load_base(record: dict, device: str | torch.device = "cpu", path=None,
              allow_pickle: bool = False) -> nn.Module:
    """The base a :func:`base_record` describes (``path`` overrides the recorded directory;
    ``allow_pickle``: a float base may be read from pytorch_model.bin)."""
    directory = path if path is not None else record["path"]
    dtype = getattr(torch, str(record.get("compute_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown compute dtype {record.get('compute_dtype')!r}")
    if record.get("method") == "qlora":
        blocksize, double_quant = parse_quant_scheme(record.get("quant_scheme",
                                                                DEFAULT_QUANT_SCHEME))
        return load_quantized_hf_model(directory, dtype, blocksize, double_quant, device=device)
    return load_hf_model(directory, dtype, device, allow_pickle=allow_pickle)
