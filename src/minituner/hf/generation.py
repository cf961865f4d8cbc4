"""Sampling from a transformers causal LM with its KV cache.

The prompt runs through the model once; each later step feeds only the newest token and the
cached keys and values (``past_key_values``), so a step costs one token's forward instead of
the whole sequence's. Every row of the batch continues the same prompt, so no padding is
needed. Per step the last logits go through, in order: the repetition penalty (CTRL's rule,
as transformers applies it: a seen token's positive logit is divided by the penalty, a negative
one multiplied), then greedy choice (temperature 0) or temperature, top-k, top-p and a draw
from a seeded ``torch.Generator`` on the CPU, so the same seed gives the same text. A row stops
at a stop id (EOS, the chat template's end-of-turn token) or once its text contains a stop
string; the text is cut before the stop string.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class SamplingSettings:
    """How to continue a prompt: length, greedy or sampled, filters and stops."""

    max_new_tokens: int = 20
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    repetition_penalty: float | None = None  # > 1 discourages tokens already in the text
    stop: tuple = ()  # stop strings

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("--stop: each stop string must be non-empty")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """``logits`` (B, V) with every token id in ``seen`` (B, L) penalised (CTRL's rule)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` (B, V) with -inf outside the smallest set whose probability reaches top_p
    (the most likely token always stays)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches p
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, ordered)


def choose_next(logits: torch.Tensor, settings: SamplingSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token id of each row (B,) from its last logits (B, V)."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k is not None:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None:
        logits = top_p_filter(logits, settings.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stops) -> tuple:
    """(text before the first stop string, True) or (text, False) when none occurs."""
    found = [text.find(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers 5) or
    ``past_key_values`` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list, settings: SamplingSettings, rows: int = 1,
                 stop_ids=(), generator: torch.Generator | None = None, text_of=None,
                 context: int | None = None) -> list:
    """New token ids of each of ``rows`` continuations of ``prompt_ids`` (a stop id ends a row
    and is left out). ``text_of(ids)`` decodes, for the stop strings; ``context`` caps the
    prompt plus the new tokens."""
    budget = settings.max_new_tokens
    if context is not None:
        budget = min(budget, context - len(prompt_ids))
        if budget < 1:
            raise ValueError(f"--prompt: {len(prompt_ids)} tokens leave no room in the model's "
                             f"context of {context}")
    device = next(model.parameters()).device
    seen = torch.tensor([list(prompt_ids)] * rows)
    step_input, past, cache_name = seen.to(device), None, cache_argument(model)
    new: list = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(budget):
        out = model(input_ids=step_input, use_cache=True, **{cache_name: past})
        past = out[cache_name]
        logits = out.logits[:, -1, :].float().cpu()
        if settings.repetition_penalty is not None:
            logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        chosen = choose_next(logits, settings, generator)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            new[row].append(token)
            if settings.stop and text_of is not None:
                done[row] = cut_at_stop(text_of(new[row]), settings.stop)[1]
        if all(done):
            break
        seen = torch.cat([seen, chosen[:, None]], dim=1)
        step_input = chosen[:, None].to(device)
    return new
