"""Data-parallel training across processes (torchrun): process group, DDP, global loss scaling.

``torchrun --nproc_per_node=N -m minituner finetune ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init_distributed` reads them and joins the group (gloo on CPU, nccl on CUDA). Without
them everything here is a no-op for a single process.

Loss normalisation: with completion-only masks, processes hold different numbers of loss
tokens. Each process computes the *sum* of its token losses and divides it by the GLOBAL token
count (all-reduced, :func:`reduce_count`); DDP is given a gradient hook that *sums* the
processes' gradients instead of averaging them. The result is ``sum over all tokens /
global_count``: exactly the gradient one process computes on the whole global batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and backend ("" when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if there is one; pick the backend from the device.

    On CUDA each process uses GPU LOCAL_RANK (the device index given is replaced).
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device this process computes on (GPU LOCAL_RANK under torchrun on CUDA)."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def shutdown_distributed() -> None:
    """Leave the process group (safe to call when there is none). Unreachable objects that
    still hold the group (an FSDP model's DTensors and device mesh sit in reference cycles)
    are collected first, while the group is alive: left to interpreter exit, gloo's worker
    threads can be torn down there and abort the process after its work is done."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()  # no process tears the group down under another's last collective
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over processes (a copy; the input alone when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value.detach().clone()
    device = value.device
    if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    total = value.detach().to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def _sum_gradients_hook(state, bucket):
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around ``model`` that sums gradients over processes (only trainable tensors are
    synchronised); the model itself when not distributed."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    ddp.register_comm_hook(None, _sum_gradients_hook)
    return ddp


def reduce_count(count: int) -> int:
    """A token count summed over processes (the loss denominator of one global step)."""
    return int(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)).item())


def reduce_float(value: float) -> float:
    """A float summed over processes (e.g. the summed loss, for the log)."""
    return float(all_reduce_sum(torch.tensor(float(value), dtype=torch.float64)).item())
