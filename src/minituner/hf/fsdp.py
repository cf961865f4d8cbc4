"""FSDP2 for transformers models: which modules are blocks, NF4 weights as frozen parameters,
and the forward the loss calls (see :mod:`minituner.training.fsdp` for the engine's side).

``fully_shard`` shards parameters, not buffers, and a :class:`QuantizedLinear` keeps its NF4
codes, block scales and bias as buffers. :func:`nf4_as_parameters` turns the per-layer ones
(``packed``, ``absmax``, ``nested_absmax``, ``bias``) into frozen ``nn.Parameter``s
(``requires_grad=False``) of the same tensors, so FSDP shards them beside the float ones and
all-gathers a block's NF4 weights for its forward and backward; the small shared code tables
stay buffers.

Shard-wise loading (:func:`load_sharded_base`): the model is built with its parameters on the
meta device (transformers computes the buffers, rotary tables and masks, as usual), targeted
layers become NF4 shells (:func:`minituner.hf.load.nf4_shell`), LoRA is applied (its A and B
made real and drawn from the seed as one process draws them), the embedding and LM head are
split by vocabulary rows (:func:`shard_vocabulary`), the blocks and the root are sharded, and
only then is each process's part of the base allocated. The base is filled one module at a
time: its float tensors are read from the safetensors file(s), quantized (QLoRA) or cast
(LoRA), and each process copies its shard out, so no process holds more than one layer's float
weight beside its shards; the vocabulary-split matrices, the largest, are read a block of rows
at a time. Modules are filled in the sorted order of their state_dict names, so the base
fingerprint and tensor statistics are computed on the way, from the same values one process
would hold.
"""

from __future__ import annotations

import hashlib
import math
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from minituner.hf.load import (
    TensorSource,
    checkpoint_name,
    nf4_layer,
    nf4_shell,
    params_on_meta,
)
from minituner.hf.models import ALL_LINEAR, fuse_activations, hf_dir, hf_targets, read_hf_config
from minituner.hf.run import base_parameter_count
from minituner.lora import lora_layers
from minituner.lora.adapters import StreamedTensor, fingerprint_update, tensor_stats
from minituner.lora.targets import set_submodule
from minituner.quant.nf4_io import QUANT_STATE_KEY
from minituner.quant.qlora import DequantBuffer, QuantizedLinear, parse_quant_scheme
from minituner.training import fsdp as F
from minituner.training.config import parse_init
from minituner.training.distributed import DistInfo
from minituner.training.vocab_parallel import (
    VocabShardedEmbedding,
    VocabShardedHead,
    row_range,
    vocab_sharded_parameter,
)

__all__ = ["FSDPForward", "NF4_SHARDED", "ShardedBase", "check_fsdp_settings",
           "load_sharded_base", "nf4_as_parameters", "shard_vocabulary", "transformer_blocks"]

NF4_SHARDED = ("packed", "absmax", "nested_absmax", "bias")  # per-layer tensors FSDP shards


def transformer_blocks(model: nn.Module) -> list:
    """The decoder blocks: the ModuleList as long as the config's layer count (GPT-2's
    ``transformer.h``, Llama's ``model.layers``); empty when there is none."""
    layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return list(module)
    return []


def nf4_as_parameters(model: nn.Module) -> int:
    """Turn every QuantizedLinear's codes, scales and bias into frozen parameters; returns how
    many layers were changed."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        for name in NF4_SHARDED:
            tensor = layer._buffers.get(name)
            if tensor is None:
                continue
            del layer._buffers[name]
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    return len(layers)


class FSDPForward:
    """The sharded model's forward as the loss calls it: through the root, so FSDP gathers
    the root's parameters (embeddings, head) first. ``.module`` is the model, as DDP's."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def check_fsdp_settings(cfg) -> None:
    """Refuse --fsdp outside torchrun and with the settings it does not shard."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError("--fsdp needs torchrun: torchrun --nproc_per_node=N -m minituner "
                         "finetune ... --fsdp")
    refused = {"--method dora/qdora": cfg.method in ("dora", "qdora"),
               "--init pissa/loftq": parse_init(cfg.init)[0] in ("pissa", "loftq"),
               "--modules-to-save": bool(cfg.modules_to_save),
               "--add-tokens": bool(cfg.add_tokens)}
    for flag, given in refused.items():
        if given:
            raise ValueError(f"--fsdp cannot be used with {flag} (FSDP shards LoRA and QLoRA "
                             "adapters only)")


@dataclass
class ShardedBase:
    """What :func:`load_sharded_base` returns: the sharded model (LoRA applied) and what one
    process computes from the whole base: its fingerprint, tensor statistics and size."""

    model: nn.Module
    fingerprint: str
    tensor_stats: dict
    base_params: int


def load_sharded_base(record: dict, info: DistInfo, device: torch.device,
                      add_adapters) -> ShardedBase:
    """The base a :func:`minituner.hf.load.base_record` describes, LoRA applied by
    ``add_adapters(model)``, sharded over the processes and filled one module at a time (see
    the module docstring). A bf16 run reduces gradients in fp32."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, record["compute_dtype"])
    config = read_hf_config(record["path"])
    source = TensorSource(hf_dir(record["path"]))
    if any(key.endswith(QUANT_STATE_KEY) for key in source.keys()):
        raise ValueError(f"{source.directory}: --fsdp loads float checkpoints only, not one "
                         "already quantized by bitsandbytes")
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = getattr(model, "base_model_prefix", "")
    if record["method"] == "qlora":
        _nf4_shells(model, record, dtype)
    fuse_activations(model)
    model.requires_grad_(False)
    units = _fill_units(model, source, prefix)
    base_params = base_parameter_count(model)  # before NF4 tensors become parameters
    model = add_adapters(model)
    _draw_lora(model, lora_seed(model))
    blocks = transformer_blocks(model)
    F.check_fsdp_blocks(blocks, info)
    nf4_as_parameters(model)
    replaced = shard_vocabulary(model, device) if info.enabled else {}
    for unit in units:  # the split embedding and head are filled through their new modules
        unit.module = replaced.get(unit.module, unit.module)
    F.shard_blocks(model, blocks, info,
                   reduce_dtype=torch.float32 if dtype != torch.float32 else None,
                   ignored_params={m.weight for m in replaced.values()})
    _allocate(model, device)
    digest, stats = hashlib.sha256(), {}
    for unit in units:
        _fill(unit, source, dtype, digest, stats)
    return ShardedBase(model, digest.hexdigest(), stats, base_params)


def shard_vocabulary(model: nn.Module, device: torch.device) -> dict:
    """Split a frozen ``nn.Embedding`` and a bias-free ``nn.Linear`` LM head by vocabulary rows
    over the processes (:mod:`minituner.training.vocab_parallel`); a tied pair shares one split
    tensor. Returns {replaced module: its split replacement}; empty, and nothing changes, when
    the head is adapted, has a bias or is not a Linear (FSDP's root unit then holds them)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or type(head) is not nn.Linear or \
            head.bias is not None or embedding.weight.requires_grad or head.weight.requires_grad:
        return {}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    rows = vocab_sharded_parameter(embedding.weight, mesh)
    head_rows = rows if head.weight is embedding.weight else \
        vocab_sharded_parameter(head.weight, mesh)
    split_embedding, split_head = VocabShardedEmbedding(rows), VocabShardedHead(head_rows)
    model.set_input_embeddings(split_embedding)
    model.set_output_embeddings(split_head)
    return {embedding: split_embedding, head: split_head}


def _nf4_shells(model: nn.Module, record: dict, dtype: torch.dtype) -> None:
    """Replace the targeted Linears / Conv1Ds by NF4 shells (values filled after sharding)."""
    blocksize, double_quant = parse_quant_scheme(record["quant_scheme"])
    buffer = DequantBuffer()
    for name in hf_targets(model, ALL_LINEAR):
        set_submodule(model, name, nf4_shell(model.get_submodule(name), dtype, blocksize,
                                             double_quant, buffer))


@dataclass
class _Unit:
    """One module to fill: its state_dict prefix, the module, and the checkpoint key of each
    of its parameters and loaded buffers (a tied parameter: the key of its first name)."""

    prefix: str
    module: nn.Module
    keys: dict
    first: str  # its smallest state_dict name: units are filled in this order


def _fill_units(model: nn.Module, source: TensorSource, prefix: str) -> list:
    """Every module holding base tensors, in the sorted order of their state_dict names (a
    module's names are contiguous in that order: ``.`` sorts before any name character)."""
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(param), name)
    units, missing = [], []
    for path, module in model.named_modules():
        at = f"{path}." if path else ""
        keys = {}
        if isinstance(module, QuantizedLinear):
            names = ["weight"] + (["bias"] if module.bias is not None else [])
        else:
            names = [n for n, p in module._parameters.items() if p is not None]
            keys.update({n: checkpoint_name(source, at + n, prefix) for n, b in
                         module._buffers.items()
                         if b is not None and checkpoint_name(source, at + n, prefix)})
        for leaf in names:
            param = module._parameters.get(leaf)
            canonical = first_name.get(id(param), at + leaf) if param is not None else at + leaf
            keys[leaf] = checkpoint_name(source, canonical, prefix)
            if keys[leaf] is None:
                missing.append(at + leaf)
        persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
        saved = [at + n for n in names + persistent]
        if saved:
            units.append(_Unit(at, module, keys, min(saved)))
    if missing:
        raise ValueError(f"{source.directory}: checkpoint lacks tensors {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return sorted(units, key=lambda unit: unit.first)


def lora_seed(model: nn.Module):
    """The seed the model's LoRA layers were drawn with (their config's)."""
    layers = lora_layers(model)
    return layers[0][1].config.seed if layers and layers[0][1].config is not None else None


@torch.no_grad()
def _draw_lora(model: nn.Module, seed) -> None:
    """Make LoRA's A and B real (fp32 on the CPU) and draw them again from ``seed``, in the
    order :func:`minituner.lora.apply_lora` drew them: on a meta base they were not stored."""
    if seed is None:
        raise ValueError("--fsdp needs a seed: LoRA's A is drawn from it on every process")
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for name in ("lora_A", "lora_B"):
            param = getattr(layer, name)
            if param.is_meta:
                setattr(layer, name, nn.Parameter(torch.zeros(param.shape, dtype=param.dtype)))
        layer.reset_lora_parameters(generator)


@torch.no_grad()
def _allocate(model: nn.Module, device: torch.device) -> None:
    """Give every sharded meta parameter real (uninitialised) local memory on ``device``,
    keeping the values of the parameters and buffers that already have them (LoRA, tables)."""
    kept = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and not _local(param).is_meta:
                kept.append((module, name, True, _local(param).detach().clone()))
        kept.extend((module, name, False, buffer) for name, buffer in module._buffers.items()
                    if buffer is not None)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:  # its _apply moves buffers only; here its parameters need memory
        layer._apply = types.MethodType(nn.Module._apply, layer)
    try:
        model.to_empty(device=device)
    finally:
        for layer in layers:
            del layer.__dict__["_apply"]
    for module, name, is_param, value in kept:
        if is_param:
            _local(module._parameters[name]).copy_(value)
        else:
            module._buffers[name] = value
    for module in model.modules():  # QuantizedLinear's own move keeps its shared code table
        if isinstance(module, QuantizedLinear):
            module._apply(lambda t: t.to(device))
        else:
            module._buffers.update({name: b.to(device) for name, b in module._buffers.items()
                                    if b is not None})


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if F.is_sharded(tensor) else tensor


@torch.no_grad()
def _put(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's part of the full tensor ``full`` into ``param``."""
    if F.is_sharded(param):
        param.to_local().copy_(F._shard_of(full, param).to_local())
    else:
        param.copy_(full.to(param.device, param.dtype))


def _float(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _fill(unit: _Unit, source: TensorSource, dtype: torch.dtype, digest, stats: dict) -> None:
    """Fill one module's shards from the checkpoint, and feed its tensors, as one process
    holds them, to the base fingerprint ``digest`` and ``stats`` in sorted name order."""
    module = unit.module
    if isinstance(module, (VocabShardedEmbedding, VocabShardedHead)):
        name = unit.prefix + "weight"
        stats[name] = _stream_rows(module.weight, source, unit.keys["weight"], dtype, name,
                                   digest)
        return
    for name, tensor in _filled(unit, source, dtype):
        fingerprint_update(digest, name, tensor)
        stats[name] = tensor_stats(tensor)


def _filled(unit: _Unit, source: TensorSource, dtype: torch.dtype) -> list:
    """Fill one module's shards from the checkpoint; returns its (state_dict name, full
    tensor) pairs as one process holds them, in sorted order."""
    module = unit.module
    if isinstance(module, QuantizedLinear):
        bias = None if "bias" not in unit.keys else _float(source.get(unit.keys["bias"]), dtype)
        full = nf4_layer(source.get(unit.keys["weight"]), bias, module.source_fan_in_fan_out,
                         dtype, module.blocksize, module.double_quant)
        for name in NF4_SHARDED:
            if getattr(module, name) is not None:
                _put(getattr(module, name), getattr(full, name))
        module.offset = full.offset
        saved = full.state_dict(prefix=unit.prefix)
        return sorted(saved.items())
    saved = {}
    for name, key in unit.keys.items():
        if name in module._parameters:
            full = _float(source.get(key), dtype)
            _put(module._parameters[name], full)
        else:
            full = _float(source.get(key), module._buffers[name].dtype)
            module._buffers[name] = full.to(module._buffers[name].device)
        saved[unit.prefix + name] = full
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            saved.setdefault(unit.prefix + name, buffer)
    return sorted(saved.items())


STREAMED_BLOCK_ELEMENTS = 1 << 22  # rows read at a time: 16 MiB of fp32


@torch.no_grad()
def _stream_rows(param: nn.Parameter, source: TensorSource, key: str, dtype: torch.dtype,
                 name: str, digest) -> dict:
    """Fill a vocabulary-split matrix (this process's rows) from the checkpoint a block of rows
    at a time, every row fed to the fingerprint and statistics: no process ever holds the whole
    embedding or head. Returns the tensor's statistics entry."""
    shape = source.shape(key)
    streamed = StreamedTensor(digest, name, dtype, shape)
    per_row = max(1, math.prod(shape[1:]))
    block = max(1, STREAMED_BLOCK_ELEMENTS // per_row)
    local, (mine, mine_stop) = param.to_local(), row_range(param)
    for first in range(0, shape[0], block):
        stop = min(first + block, shape[0])
        rows = _float(source.rows(key, first, stop), dtype)
        streamed.update(rows)
        lo, hi = max(first, mine), min(stop, mine_stop)
        if lo < hi:
            local[lo - mine:hi - mine].copy_(rows[lo - first:hi - first])
    return streamed.entry()
