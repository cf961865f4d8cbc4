"""Helpers for the transformers tests: tiny random-init model directories and shared checks."""

from __future__ import annotations

import torch

from minituner.lora import lora_layers


def randomize_lora_b(model, seed: int = 2, scale: float = 0.05) -> None:
    """Give every lora_B nonzero values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


def token_batch(vocab: int = 512, batch: int = 2, seq: int = 12, seed: int = 9) -> torch.Tensor:
    """Random token ids inside the toy vocabulary."""
    return torch.randint(7, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of a transformers model (or a PEFT wrapper around one)."""
    model.eval()
    return model(input_ids=ids, use_cache=False).logits.float()
