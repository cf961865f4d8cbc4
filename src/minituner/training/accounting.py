"""Exact tensor accounting of a training step: parameters, gradients, optimizer state and the
activations autograd saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``).

Weights count ``numel * element_size``; saved activations count each distinct storage once
(its ``nbytes``, so views of one tensor are not double counted); a saved tensor that shares a
parameter's or buffer's storage is not an activation (it is counted with the weights). The
process's peak RSS is a different, much larger number: it includes the Python interpreter,
torch and every import.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> dict:
    """Trainable parameters, and the frozen weights as held in memory: frozen parameters plus
    every module buffer (NF4 codes and scales for a QLoRA base, RoPE tables), each storage once.
    QLoRA's shared dequantization scratch is reported apart (it is working memory)."""
    trainable = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    seen, frozen = set(), 0
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            frozen += storage.nbytes()
    scratch = {id(buf): buf.nbytes() for module in model.modules()
               if (buf := getattr(module, "dequant_buffer", None)) is not None}
    return {"parameters_trainable_bytes": trainable, "frozen_weight_bytes": frozen,
            "dequant_scratch_bytes": sum(scratch.values())}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (Adam m, v, step)."""
    total = 0
    for state in optimizer.state.values():
        total += sum(_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def step_tensor_bytes(model: nn.Module, loss_fn, batch: dict) -> dict:
    """Saved-activation and gradient bytes of one forward/backward on ``batch``.

    The gradients are cleared afterwards, so calling this leaves the model as it was.
    """
    weights = list(model.parameters()) + list(model.buffers())
    known = {t.untyped_storage().data_ptr() for t in weights}
    saved: dict = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    named = [p for p in model.parameters() if p.requires_grad]
    previous = [p.grad for p in named]
    for p in named:
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum, count = loss_fn(model, batch)
    (loss_sum / max(1, int(count))).backward()
    grads = sum(_bytes(p.grad) for p in named if p.grad is not None)
    for p, grad in zip(named, previous, strict=True):
        p.grad = grad
    return {"saved_activation_bytes": sum(saved.values()), "gradient_bytes": grads,
            "batch_shape": list(batch["input_ids"].shape)}


def training_state_bytes(model: nn.Module, optimizer, loss_fn, batch: dict) -> dict:
    """The four buckets of the exact training state (weights split three ways), plus total."""
    out = weight_bytes(model)
    out.update(step_tensor_bytes(model, loss_fn, batch))
    out["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    out["total_bytes"] = sum(out[k] for k in (
        "parameters_trainable_bytes", "frozen_weight_bytes", "gradient_bytes",
        "optimizer_state_bytes", "saved_activation_bytes", "dequant_scratch_bytes"))
    out["note"] = (
        "exact tensor bytes of the training state on one micro-batch of the given shape; "
        "frozen weights include every buffer (RoPE tables; NF4 codes and scales for QLoRA); "
        "activations are the tensors autograd saved for backward (weights excluded); "
        "dequant scratch is QLoRA's shared dequantized-weight buffer"
    )
    return out
