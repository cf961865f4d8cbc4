"""Vocabulary-parallel embedding, LM head and loss: the vocabulary's rows split over processes.

Under FSDP2 a unit's parameters are all-gathered whole for its forward and backward. For the
embedding and the LM head that is the largest tensor of a small model (GPT-2-small's tied
embedding is 150 of its 192 MiB in fp32) and, for a 70B model, 2 x 2.1 GB: gathered, every
process holds it whole, beside its shard. Here the matrix is never gathered. Each process
keeps the rows of its slice of the vocabulary, ``torch.chunk`` order (a ``Shard(0)``
DTensor: ``to_local()`` is the slice, ``full_tensor()`` the whole), and

- the embedding: every process's token ids are all-gathered; each process looks up the ids
  that fall in its slice (zeros for the others) and an all-reduce sums the parts, so every
  token gets its row from the one process that holds it. The embedding is frozen: no backward.
- the loss: every process's hidden states are all-gathered; each process makes the logits of
  its vocabulary slice for all of them, chunk by chunk as :mod:`minituner.training.losses`
  does, and the softmax is completed across processes: an all-reduce of the row maxima (MAX),
  then one of the sums of exponentials and the target logits (SUM). Each process returns the
  summed loss of its own tokens. The gradient with respect to the hidden states (``softmax -
  onehot`` of the slice, times the slice's rows) is made in the same pass, summed over the
  processes, and each keeps its own tokens' rows: the gradient one process computes with the
  whole head. Gradients are made in forward only when the hidden states need one.
- the head's forward (``logits_to_keep``, validation): hidden states are all-gathered, each
  process makes its slice's logits for all of them, and the slices are all-gathered, so the
  model's ``logits`` are the whole vocabulary's, as without sharding (no gradient).

Every function here is a collective: all processes call it together, with their own tokens
(different counts are allowed: rows are padded to the largest count for the gathers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as Fn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from minituner.training.losses import chunk_rows

__all__ = ["VocabShardedEmbedding", "VocabShardedHead", "row_range", "vocab_parallel_nll",
           "vocab_sharded_parameter"]


def vocab_sharded_parameter(weight: torch.Tensor, mesh) -> nn.Parameter:
    """A frozen parameter holding ``weight``'s rows split over ``mesh`` (``Shard(0)``, no
    traffic: every process passes the same tensor, or a meta one to fill later)."""
    sharded = distribute_tensor(weight.detach(), mesh, [Shard(0)], src_data_rank=None)
    return nn.Parameter(sharded, requires_grad=False)


def row_range(weight: DTensor) -> tuple:
    """(first, stop): the vocabulary rows this process holds (``torch.chunk`` sizes: ceil(V / N)
    each, the last process the rest)."""
    per_rank = _rows_per_rank(weight)
    first = min(weight.device_mesh.get_local_rank() * per_rank, weight.shape[0])
    return first, min(first + per_rank, weight.shape[0])


def _rows_per_rank(weight: DTensor) -> int:
    return -(-weight.shape[0] // weight.device_mesh.size())


def _gather_rows(rows: torch.Tensor, most: int, group, fill) -> torch.Tensor:
    """Every process's ``rows`` (n_i, ...) padded to ``most`` with ``fill``, concatenated in
    rank order: (world * most, ...)."""
    padded = rows.new_full((most, *rows.shape[1:]), fill)
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)


def _row_counts(n: int, device: torch.device, group) -> list:
    """Every process's row count, in rank order."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return [int(c) for c in counts]


def _own(n: int, most: int, group) -> slice:
    """This process's rows in a gathered (world * most, ...) tensor."""
    start = dist.get_rank(group) * most
    return slice(start, start + n)


@torch.no_grad()
def sharded_embedding(ids: torch.Tensor, weight: DTensor) -> torch.Tensor:
    """``F.embedding(ids, full weight)`` from the row slices: see the module docstring."""
    group = weight.device_mesh.get_group()
    local = weight.to_local()
    start = row_range(weight)[0]
    flat = ids.reshape(-1)
    most = max(_row_counts(flat.numel(), flat.device, group))
    every = _gather_rows(flat, most, group, fill=-1)
    inside = (every >= start) & (every < start + local.shape[0])
    rows = Fn.embedding(torch.where(inside, every - start, 0), local)
    rows.masked_fill_(~inside.unsqueeze(1), 0)
    dist.all_reduce(rows, group=group)
    return rows[_own(flat.numel(), most, group)].reshape(*ids.shape, local.shape[1])


class VocabShardedEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose rows are split over the processes."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return sharded_embedding(input_ids, self.weight)


class VocabShardedHead(nn.Module):
    """A frozen bias-free LM head whose rows (vocabulary entries) are split over processes;
    its forward gives the whole vocabulary's logits of this process's tokens (no gradient: the
    training loss is :func:`vocab_parallel_nll`, which never makes them)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, local = self.weight, self.weight.to_local()
        group, per_rank = weight.device_mesh.get_group(), _rows_per_rank(weight)
        flat = hidden.reshape(-1, hidden.shape[-1])
        most = max(_row_counts(flat.shape[0], flat.device, group))
        every = _gather_rows(flat, most, group, fill=0)  # every process's tokens
        logits = Fn.pad(every @ local.t(), (0, per_rank - local.shape[0]))
        slices = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(slices, logits, group=group)  # every slice of the vocabulary
        own = _own(flat.shape[0], most, group)
        whole = torch.cat([part[own] for part in slices], dim=1)[:, :weight.shape[0]]
        return whole.reshape(*hidden.shape[:-1], weight.shape[0])


class VocabParallelNLL(torch.autograd.Function):
    """Summed CE of this process's rows against the vocabulary split over the processes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        local, start = weight.to_local(), row_range(weight)[0]
        group = weight.device_mesh.get_group()
        need_grad = ctx.needs_input_grad[0]
        n = hidden.shape[0]
        most = max(_row_counts(n, hidden.device, group))
        every = _gather_rows(hidden.detach(), most, group, fill=0)
        every_target = _gather_rows(targets, most, group, fill=ignore_index)
        grad = (torch.zeros(every.shape, dtype=torch.float32, device=every.device)
                if need_grad else None)  # summed over the slices in fp32
        losses = torch.zeros(every.shape[0], dtype=torch.float32, device=hidden.device)
        step = chunk_rows(every.shape[0], _rows_per_rank(weight))
        for first in range(0, every.shape[0], step):
            rows = slice(first, first + step)
            h, target = every[rows], every_target[rows]
            valid = target != ignore_index
            here = valid & (target >= start) & (target < start + local.shape[0])
            index = torch.where(here, target - start, 0).unsqueeze(1)
            logits = torch.mm(h, local.t()).float()
            top = logits.max(dim=1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(top.unsqueeze(1))
            picked = logits.gather(1, index).squeeze(1) * here
            exps = logits.exp_()
            sums = torch.stack([exps.sum(dim=1), picked])
            dist.all_reduce(sums, group=group)
            total_exp, target_logit = sums[0], sums[1]
            losses[rows] = (total_exp.log() - target_logit) * valid
            if not need_grad:
                continue
            probs = exps.div_(total_exp.unsqueeze(1))  # this slice's softmax, in place
            probs.scatter_add_(1, index, -here.to(probs.dtype).unsqueeze(1))
            part = grad[rows]
            if local.dtype == torch.float32:
                torch.mm(probs, local, out=part)
            else:
                part.copy_(torch.mm(probs.to(local.dtype), local))
            part.mul_(valid.to(part.dtype).unsqueeze(1))
        own = _own(n, most, group)
        grad_own = None
        if need_grad:
            dist.all_reduce(grad, group=group)  # every slice's part of every row's gradient
            grad_own = grad[own].to(hidden.dtype, copy=True)  # not a view of every row
        ctx.save_for_backward(grad_own)
        return losses[own].sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_own,) = ctx.saved_tensors
        return grad_own * grad_loss.to(grad_own.dtype), None, None, None


def vocab_parallel_nll(hidden: torch.Tensor, weight: DTensor, targets: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ full_weight^T`` against ``targets`` (``ignore_index``
    counts for nothing), with ``weight`` split by rows over the processes: the loss one
    process computes with the whole head, up to float summation order (a collective)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden "
                         f"{tuple(hidden.shape)} without its last dimension")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return VocabParallelNLL.apply(flat, weight, targets.reshape(-1), ignore_index)
