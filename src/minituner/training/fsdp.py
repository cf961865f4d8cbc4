"""Fully sharded data parallelism (PyTorch's FSDP2, ``fully_shard``) for adapter training.

Under ``torchrun ... finetune --fsdp`` every transformer block, and then the model's root
(what is left: the final norm, learned positions; the embeddings and LM head too unless the
caller split them by vocabulary rows, :mod:`minituner.training.vocab_parallel`, and passed them
as ``ignored_params``), is handed to :func:`torch.distributed.fsdp.fully_shard`: each process
keeps 1/N of every parameter (frozen base, NF4 codes and scales, LoRA matrices), their
gradients and AdamW's moments; a block's parameters are all-gathered for its forward and
backward and freed after.
The all-gather is asynchronous (``set_unshard_async_op``), so its flat output buffer is freed
as soon as it is copied into the unit's parameters: at most one unit's gather buffer lives.

Gradients are SUMMED over processes (the divide factor is 1), as :mod:`distributed` does for
DDP: each process divides its summed token loss by the global token count, so N processes
compute the gradient one process computes on the global batch.

Checkpoints stay the single-process format: the trainable tensors and AdamW's state are
all-gathered into full tensors (small: the adapter), rank 0 writes them, and every process
takes its own shard back out of a loaded checkpoint. So a checkpoint written by N processes,
sharded or not, resumes on M processes, sharded or not, and the saved adapter is the ordinary
PEFT-format adapter. This module knows no model family: which modules are blocks is the
caller's choice (:mod:`minituner.hf.fsdp` for transformers models).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from minituner.training.distributed import DistInfo

__all__ = ["check_fsdp_blocks", "clip_gradients", "full_optimizer_state", "full_tensors",
           "is_sharded", "load_full_tensors", "load_optimizer_state", "shard_blocks",
           "total_gradient_norm", "unshard_trainable"]


def is_sharded(tensor) -> bool:
    """True for a tensor FSDP sharded over the processes (a DTensor)."""
    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered when sharded (a collective: every process calls it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(named: list) -> dict:
    """{name: detached full copy} of (name, parameter) pairs, gathering the sharded ones."""
    return {name: _full(param.detach()).clone() for name, param in named}


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``full``, laid out as the sharded tensor ``like``."""
    part = distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)  # every process holds ``full``: no traffic
    return part


@torch.no_grad()
def load_full_tensors(named: list, state: dict) -> None:
    """Copy full tensors into (name, parameter) pairs; a sharded one takes its own shard."""
    params = dict(named)
    if set(params) != set(state):
        raise ValueError("checkpoint's trainable tensors do not match the model's")
    for name, param in params.items():
        if is_sharded(param):
            param.to_local().copy_(_shard_of(state[name], param).to_local())
        else:
            param.copy_(state[name])


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered: the one-process format."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: _full(value) if is_sharded(value) else value
                              for key, value in slots.items()}
                      for index, slots in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer state; the moments of sharded parameters are re-sharded."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            slots = optimizer.state.get(param, {})
            for key, value in slots.items():
                if torch.is_tensor(value) and not is_sharded(value) and \
                        tuple(value.shape) == tuple(param.shape):
                    slots[key] = _shard_of(value, param)


@torch.no_grad()
def total_gradient_norm(params: list) -> torch.Tensor:
    """The L2 norm of every gradient together, over all processes' shards."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return _full(norm)


@torch.no_grad()
def clip_gradients(params: list, max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes sharded gradients (the norm is the global one)."""
    if not any(is_sharded(p) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm = total_gradient_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def check_fsdp_blocks(blocks: list, info: DistInfo) -> None:
    """Refuse a model with no blocks to shard, or more processes than blocks."""
    if not blocks:
        raise ValueError("--fsdp: the model has no list of transformer blocks to shard")
    if info.world_size > len(blocks):
        raise ValueError(f"--fsdp: {info.world_size} processes but the model has only "
                         f"{len(blocks)} blocks (use at most {len(blocks)} processes)")


def shard_blocks(model: nn.Module, blocks: list, info: DistInfo,
                 reduce_dtype: torch.dtype | None = None,
                 ignored_params: set | None = None) -> nn.Module:
    """``fully_shard`` each block, then the root (what is left: embeddings, head, norms).

    Gradients are summed over processes (see the module docstring). ``reduce_dtype`` (fp32
    for a bf16 run) is FSDP2's MixedPrecisionPolicy: gradients are reduced in it.
    ``ignored_params`` are left out of the root unit (already split over the processes: the
    vocabulary-parallel embedding and head, :mod:`minituner.training.vocab_parallel`).
    """
    check_fsdp_blocks(blocks, info)
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, ignored_params=ignored_params or None)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain SUM (gloo has no pre-scaled sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # each all-gather's flat buffer is freed right after its copy-out, not kept until the next
    # unit's copy-out (FSDP2's default in forward, for overlap): one gathered unit, not two
    unshard_async = getattr(model, "set_unshard_async_op", None) or model._set_unshard_async_op
    unshard_async(True)  # public in newer torch; torch 2.13 names it with an underscore
    return model


def unshard_trainable(model: nn.Module) -> None:
    """Replace every sharded trainable parameter by its full tensor (after training, before
    saving: the adapter is then the one a single process holds). Every process calls it."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and is_sharded(param):
                module._parameters[name] = nn.Parameter(_full(param.detach()).clone())
