"""Mini-GPT-shaped views of a transformers model and tokenizer, so the same evaluation, probe
scoring and sampling code runs on both.

- :class:`TokenizerView` exposes what minituner's own tokenizer does: ``engine.encode(text)``
  (ids and character offsets, no special tokens), ``encode(text, bos, eos)``, ``decode``, and
  the ids ``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` and ``context_len``. A tokenizer
  without a BOS token (GPT-2 uses one token for both) takes its EOS as BOS: scoring needs a
  token to condition the first word on.
- :class:`ModelView` is an ``nn.Module`` whose ``forward(tokens, targets=None,
  target_mask=None, attention_mask=None)`` returns logits, or ``(logits, mean masked loss)``,
  and whose ``generate`` is Mini-GPT's sampler (full recompute each step, no KV cache).
  The view is for evaluation and sampling; adapters are saved from the inner model, whose
  module paths PEFT expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.hf.models import context_length, hf_forward_logits
from minituner.models.minigpt import MiniGPT, masked_token_nll


class _Engine:
    """``encode(text)`` without special tokens, returning a tokenizers Encoding (ids, offsets)."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text: str):
        return self.backend.encode(text, add_special_tokens=False)


class TokenizerView:
    """A transformers fast tokenizer behind minituner's Tokenizer interface."""

    def __init__(self, tokenizer, context_len: int):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("the model's tokenizer is not a fast tokenizer (tokenizer.json)")
        self.hf = tokenizer
        self.engine = _Engine(backend)
        self.context_len = context_len
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.unk_id = tokenizer.unk_token_id  # None for byte-level BPEs, which never need it

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added ones included."""
        return len(self.hf)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """Token ids of ``text``, optionally framed by BOS and EOS."""
        ids = list(self.engine.encode(text).ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list) -> str:
        """Text of ``ids``, special tokens left out."""
        return self.hf.decode(ids, skip_special_tokens=True)

    def continuation_text(self, prompt_ids: list, ids: list) -> str:
        """Text ``ids`` add after ``prompt_ids`` (decoded together, so word boundaries and
        leading spaces come out as the tokenizer means them)."""
        return self.decode(list(prompt_ids) + list(ids))[len(self.decode(prompt_ids)):]


@dataclass(frozen=True)
class _ViewConfig:
    context_len: int


class ModelView(nn.Module):
    """A transformers causal LM behind Mini-GPT's forward and generate."""

    generate = MiniGPT.generate

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = _ViewConfig(context_len=context_length(inner.config) or 1024)

    def forward(self, tokens, targets=None, target_mask=None, attention_mask=None):
        """Logits (B, T, V); with ``targets``, ``(logits, mean loss over masked targets)``."""
        if tokens.shape[1] > self.config.context_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's context "
                             f"{self.config.context_len}")
        device = next(self.inner.parameters()).device
        if attention_mask is None:  # right padding never feeds real positions: attend to all
            attention_mask = torch.ones_like(tokens)
        logits = hf_forward_logits(self.inner, tokens.to(device), attention_mask.to(device))
        logits = logits.to(tokens.device)  # callers build the rest of the batch on their device
        if targets is None:
            return logits
        total, count = masked_token_nll(logits, targets, target_mask)
        return logits, total / count.clamp(min=1)


def hf_views(model: nn.Module, tokenizer) -> tuple:
    """(ModelView, TokenizerView) of a transformers model and its tokenizer."""
    return ModelView(model), TokenizerView(tokenizer, context_length(model.config) or 1024)
