"""The evaluation loop every perplexity shares: eval mode, summed masked NLL, mode restored.

``forward`` is any callable from token ids to logits (a Mini-GPT, a view of a transformers
model, or a lambda around either), so Mini-GPT and transformers evaluation run the same loop.
Each batch is a dict with ``input_ids``, ``targets`` and ``target_mask`` (as
:func:`minituner.course.data.collate_sequences` builds them); the targets are moved to the
logits' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from minituner.models.minigpt import masked_token_nll


@torch.no_grad()
def masked_nll_sum(forward: Callable, batches: Iterable[dict],
                   module: nn.Module | None = None) -> tuple:
    """(summed NLL, token count) over the masked targets of ``batches``, without gradients.

    ``module`` (default: ``forward`` itself when it is a module) is put in eval mode for the
    loop and given back its former mode afterwards, even when the loop raises.
    """
    if module is None and isinstance(forward, nn.Module):
        module = forward
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    total, count = 0.0, 0.0
    try:
        for batch in batches:
            logits = forward(batch["input_ids"])
            nll, n = masked_token_nll(logits, batch["targets"].to(logits.device),
                                      batch["target_mask"].to(logits.device))
            total += float(nll)
            count += float(n)
    finally:
        if module is not None:
            module.train(was_training)
    return total, count


def perplexity(total: float, count: float) -> float:
    """exp(mean NLL per token); a ValueError when no target token was scored."""
    if count <= 0:
        raise ValueError("no target tokens to score (every sequence is empty)")
    return math.exp(total / count)
