"""The fine-tuning objective: next-token NLL on completion tokens, NLL and a KL anchor on replay
rows, and the validation loss. Model-agnostic: they only call ``model(input_ids)`` for logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minituner.models.minigpt import masked_token_nll


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || model) over the vocabulary, (B, T)."""
    ref_logp = torch.log_softmax(reference_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def make_loss_fn(reference, kl_weight: float, replay_nll: float = 1.0) -> Callable:
    """loss_fn(model, batch) -> (summed token loss, target token count).

    The token loss is the next-token NLL on the SFT rows' completion tokens, ``replay_nll`` x
    NLL on the replay rows (``kl_mask``) and ``kl_weight`` x KL(reference || model) there.
    """

    def loss_fn(model, batch: dict) -> tuple:
        logits = model(batch["input_ids"])
        kl_mask = batch.get("kl_mask")
        weights = batch["target_mask"].float()
        if kl_mask is not None and replay_nll != 1.0:
            weights = weights - (1.0 - replay_nll) * kl_mask.float()
        total, _ = masked_token_nll(logits, batch["targets"], weights)
        count = batch["target_mask"].sum()
        if kl_weight > 0 and kl_mask is not None and bool(kl_mask.any()):
            rows = kl_mask.any(dim=1)
            with torch.no_grad():
                ref = reference(batch["input_ids"][rows])
            kl = token_kl(ref, logits[rows])
            total = total + kl_weight * (kl * kl_mask[rows].to(kl.dtype)).sum()
        return total, count

    return loss_fn
