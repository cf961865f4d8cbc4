"""Helpers for the transformers tests: tiny random-init model directories and shared checks."""

from __future__ import annotations

import json
import random

import torch

from minituner.hf.toy import WORDS
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


def write_data(path, n: int = 24, seed: int = 0):
    """Prompt/completion lines of different lengths (so processes see different token counts)."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()][:60]
    lines = []
    for i in range(n):
        if i % 6 == 5:
            lines.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))})
        else:
            lines.append({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 7))),
                          "completion": " ".join(rng.choice(words)
                                                 for _ in range(rng.randint(1, 5)))})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
