"""The evaluation loop every validation loss and perplexity shares: eval mode, summed masked
NLL over the target tokens, mode restored.

``forward(model, batch)`` gives the logits of a batch (Mini-GPT: ``model(input_ids)``;
transformers: ``model(input_ids=..., attention_mask=...)``), so both model kinds, the
fine-tuning validator, pretraining's validation and test loss and the control perplexity all
run :func:`masked_nll_sum`. A batch is a dict with ``input_ids``, ``targets`` and
``target_mask``, as :func:`minituner.training.sampling.collate` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from minituner.models.minigpt import masked_token_nll
from minituner.training.sampling import collate


def call_model(model: nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a Mini-GPT style model: ``model(input_ids)``."""
    return model(batch["input_ids"])


@torch.no_grad()
def masked_nll_sum(model: nn.Module, batches: Iterable[dict],
                   forward: Callable = call_model) -> tuple:
    """(summed NLL, token count) over the masked targets of ``batches``, without gradients.

    ``model`` is in eval mode for the loop and gets its former mode back afterwards, even when
    the loop raises.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for batch in batches:
            logits = forward(model, batch)
            nll, n = masked_token_nll(logits, batch["targets"].to(logits.device),
                                      batch["target_mask"].to(logits.device))
            total, count = total + float(nll), count + float(n)
    finally:
        model.train(was_training)
    return total, count


def sequence_batches(sequences: list, pad_id: int, batch_size: int,
                     device: torch.device | str | None = None) -> Iterator[dict]:
    """Collated batches of ``batch_size`` sequences (id lists or {"ids", "mask"}), in order."""
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start : start + batch_size], pad_id)
        yield batch if device is None else {key: t.to(device) for key, t in batch.items()}


def summed_nll(model: nn.Module, sequences: list, pad_id: int, forward: Callable = call_model,
               batch_size: int = 64, device: torch.device | str | None = None) -> tuple:
    """(sum of the masked next-token NLL, target count) of encoded ``sequences``."""
    return masked_nll_sum(model, sequence_batches(sequences, pad_id, batch_size, device), forward)


def perplexity(total: float, count: float) -> float:
    """exp(mean NLL per token); a ValueError when no target token was scored."""
    if count <= 0:
        raise ValueError("no target tokens to score (every sequence is empty)")
    return math.exp(total / count)


@torch.no_grad()
def masked_token_stats(model: nn.Module, batches: Iterable[dict],
                       forward: Callable = call_model) -> tuple:
    """(summed NLL, target count, correct greedy next tokens) over the masked targets of
    ``batches``, without gradients; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0.0, 0.0
    try:
        for batch in batches:
            logits = forward(model, batch)
            targets = batch["targets"].to(logits.device)
            mask = batch["target_mask"].to(logits.device)
            nll, n = masked_token_nll(logits, targets, mask)
            hits = (logits.argmax(-1) == targets) & mask.bool()
            total, count, correct = total + float(nll), count + float(n), correct + float(
                hits.sum())
    finally:
        model.train(was_training)
    return total, count, correct


def make_validator(sequences: list, pad_id: int, forward: Callable = call_model,
                   batch_size: int = 128, device: torch.device | str | None = None,
                   reduce_sum: Callable[[list], list] | None = None) -> Callable:
    """evaluate(model) -> {"val_loss", "val_ppl", "val_token_accuracy"}: the masked NLL per
    target token and the fraction of target tokens the model ranks first.

    ``reduce_sum`` sums [nll, count, correct] over processes (each scores its own share of
    ``sequences``) in a distributed run.
    """

    def evaluate(model: nn.Module) -> dict:
        batches = sequence_batches(sequences, pad_id, batch_size, device)
        totals = list(masked_token_stats(model, batches, forward))
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        loss = totals[0] / max(totals[1], 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                "val_token_accuracy": totals[2] / max(totals[1], 1.0)}

    return evaluate


def evaluate_loss(model: nn.Module, sequences: list, pad_id: int, batch_size: int = 64) -> float:
    """Mean per-token NLL of ``sequences`` (every predicted token, <eos> included)."""
    total, count = summed_nll(model, sequences, pad_id, batch_size=batch_size)
    return total / max(count, 1.0)
