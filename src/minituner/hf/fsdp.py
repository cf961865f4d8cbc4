"""FSDP2 for transformers models: which modules are blocks, NF4 weights as frozen parameters,
and the forward the loss calls (see :mod:`minituner.training.fsdp` for the engine's side).

``fully_shard`` shards parameters, not buffers, and a :class:`QuantizedLinear` keeps its NF4
codes, block scales and bias as buffers. :func:`nf4_as_parameters` turns the per-layer ones
(``packed``, ``absmax``, ``nested_absmax``, ``bias``) into frozen ``nn.Parameter``s
(``requires_grad=False``) of the same tensors, so FSDP shards them beside the float ones and
all-gathers a block's NF4 weights for its forward and backward; the small shared code tables
stay buffers. Quantize-on-load is unchanged (layers read and quantized one at a time, so no
process ever holds the float model whole); after sharding, each process keeps 1/N of it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from minituner.quant.qlora import QuantizedLinear
from minituner.training import fsdp as F
from minituner.training.config import parse_init
from minituner.training.distributed import DistInfo

__all__ = ["FSDPForward", "NF4_SHARDED", "check_fsdp_settings", "nf4_as_parameters",
           "shard_hf_model", "transformer_blocks"]

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


def shard_hf_model(model: nn.Module, info: DistInfo, dtype: torch.dtype) -> nn.Module:
    """Shard a (LoRA-wrapped) transformers model over the processes: each block, then the root
    (embeddings and the tied head in one unit). A bf16 run reduces gradients in fp32."""
    blocks = transformer_blocks(model)
    F.check_fsdp_blocks(blocks, info)
    nf4_as_parameters(model)
    reduce_dtype = torch.float32 if dtype != torch.float32 else None
    return F.shard_blocks(model, blocks, info, reduce_dtype=reduce_dtype)


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
