"""Language-model head plus cross-entropy, computed in chunks of tokens.

A causal LM's loss needs ``logits = hidden @ W^T`` over the whole vocabulary: for GPT-2
(50,257 tokens) at batch 4 x 128 that is a 103 MB fp32 tensor, and autograd's plain path
holds it, its log-softmax and their gradients (about four such tensors at the peak).
:func:`chunked_lm_loss` walks the tokens in chunks: each chunk's logits are made, turned into
their loss and their gradient (``softmax - onehot``, divided by the token count) at once, and
the gradient is pushed through the head right away (``grad_hidden = G W``, and ``G^T hidden``
into the head's weight gradient when it trains). Only one chunk of logits exists at a time;
the FLOPs are those of the plain path, nothing is recomputed. The backward then just scales
the stored gradients by the incoming one.

Logits are made in the hidden dtype and upcast to fp32 for the log-softmax, as transformers
does. The per-token factor (1 / token count, 0 for ignored targets) is applied to the
(tokens, d) gradient, not to the (tokens, vocab) probabilities: one pass fewer over the
largest tensor.
The gradients are computed in the forward only when an input needs one (training); under
``torch.no_grad`` this is a memory-light loss.

For transformers models, :func:`masked_lm_nll` (what fine-tuning runs) takes the final hidden
states from the model's body (through the DDP wrapper when there is one) and scores them here;
:func:`causal_lm_loss` is the same with the usual next-token shift and mean.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # logits per chunk at most: 64 MiB of fp32


def chunk_rows(n_tokens: int, vocab_size: int,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: as few chunks as keep each chunk's logits within ``chunk_elements``
    values, split evenly (a GEMM over 254 rows runs faster per row than one over 166 + 88)."""
    most = max(16, chunk_elements // max(1, vocab_size))
    n_chunks = -(-max(1, n_tokens) // most)
    return -(-max(1, n_tokens) // n_chunks)


class ChunkedLMLoss(torch.autograd.Function):
    """loss = CE(hidden @ weight^T + bias, targets), gradients made chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, rows, mean):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        valid_all = targets != ignore_index
        count = int(valid_all.sum())
        divisor = float(max(count, 1)) if mean else 1.0
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_weight else None)
        grad_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                     if need_bias else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            valid = valid_all[start:start + rows]
            index = torch.where(valid, targets[start:start + rows], 0).unsqueeze(1)
            logits = (torch.mm(h, weight.t()) if bias is None
                      else torch.addmm(bias, h, weight.t()))
            log_probs = torch.log_softmax(logits, dim=1, dtype=torch.float32)
            del logits
            counted = valid.to(torch.float32)
            total -= (log_probs.gather(1, index).squeeze(1) * counted).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            probs = log_probs.exp_()  # softmax, in place
            probs.scatter_add_(1, index, -counted.unsqueeze(1))  # minus the one-hot target
            # Each row's gradient is scaled by counted / divisor: applied to the small
            # (rows, d) factors and results, never to the (rows, vocab) matrix.
            row_scale = (counted / divisor).unsqueeze(1)
            grad_logits = probs.to(hidden.dtype)
            if need_hidden:
                part = grad_hidden[start:start + rows]
                torch.mm(grad_logits, weight, out=part)
                part.mul_(row_scale.to(part.dtype))
            if need_weight:
                scaled_h = (h * row_scale).to(h.dtype)
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), scaled_h)
                else:
                    grad_weight += torch.mm(grad_logits.t(), scaled_h).float()
            if need_bias:
                grad_bias += torch.mv(probs.t(), row_scale.squeeze(1))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        out = [None, None, None]
        if grad_hidden is not None:
            out[0] = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            out[1] = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            out[2] = (grad_bias * grad_loss).to(bias_dtype)
        return (*out, None, None, None, None)


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T (+ bias)`` against ``targets``, chunk by chunk.

    ``hidden`` (..., d) and ``targets`` (...) hold one row per token; targets equal to
    ``ignore_index`` count for nothing. ``reduction`` "mean" divides by the counted tokens,
    "sum" does not. Equal to ``F.cross_entropy(hidden @ weight.T, targets)`` up to float
    summation order, with the full logits tensor never in memory.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden "
                         f"{tuple(hidden.shape)} without its last dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"targets must hold integer token ids, got {targets.dtype}")
    n_tokens = targets.numel()
    rows = chunk_rows(n_tokens, weight.shape[0]) if chunk_size is None else int(chunk_size)
    if rows < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return ChunkedLMLoss.apply(flat, weight, bias, targets.reshape(-1), ignore_index, rows,
                               reduction == "mean")


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head when it is a plain ``nn.Linear`` whose logits can be chunked, and
    its forward takes ``logits_to_keep`` (so the full logits need not be made); else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:  # an adapted head (LoRA on lm_head) keeps the plain path
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return head


def final_hidden_states(forward_model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The final hidden states (batch, seq, d) of a transformers causal LM, for a loss that
    runs its own head: the body alone, or through a wrapper (DDP, the FSDP root) that must see
    the forward, whose head then scores one position only (``logits_to_keep=1``)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    body = getattr(forward_model, getattr(forward_model, "base_model_prefix", ""), None)
    if isinstance(body, nn.Module):  # not wrapped: the body alone, no LM head call at all
        return body(**inputs).last_hidden_state
    return forward_model(**inputs, output_hidden_states=True,
                         logits_to_keep=1).hidden_states[-1]


def masked_lm_nll(forward_model: nn.Module, head: nn.Linear, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, targets: torch.Tensor,
                  mask: torch.Tensor, chunk_size: int | None = None,
                  position_ids: torch.Tensor | None = None) -> tuple:
    """(summed NLL over the masked targets, their count), the LM head run chunked.

    ``forward_model`` is the model (its body is called: on CPU, transformers' bf16 head on one
    kept position copies the whole head weight, about 0.5 s a GPT-2 step) or its DDP wrapper
    (called with ``logits_to_keep=1``, so DDP sees the forward); position t is scored against
    ``targets[:, t]`` where ``mask`` is set. Equal to ``masked_token_nll(logits, targets, mask)``
    up to float summation order, without the (tokens, vocab) logits in memory.
    ``position_ids`` (packed rows) is passed to the model when given.
    """
    hidden = final_hidden_states(forward_model, input_ids, attention_mask, position_ids)
    labels = torch.where(mask.bool(), targets, -100)
    total = chunked_lm_loss(hidden, head.weight, labels, head.bias,
                            chunk_size=chunk_size, reduction="sum")
    return total, mask.sum()


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, ignore_index: int = -100,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss of a transformers causal LM, the head and loss run chunked.

    Position t predicts ``labels[:, t + 1]`` (``labels`` defaults to ``input_ids``), the same
    shift and mean as ``model(input_ids, labels=labels).loss``, through :func:`masked_lm_nll`
    (what fine-tuning runs).
    """
    head = plain_output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}: its output head is not a plain Linear, or its "
                         "forward takes no logits_to_keep; the loss cannot be chunked")
    labels = input_ids if labels is None else labels
    ignored = torch.full_like(labels[:, :1], ignore_index)
    targets = torch.cat([labels[:, 1:], ignored], dim=1)
    mask = targets != ignore_index
    total, count = masked_lm_nll(model, head, input_ids, attention_mask, targets, mask,
                                 chunk_size)
    return total / count.clamp(min=1)
