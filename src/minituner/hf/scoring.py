"""Evaluation of a transformers model on the user's own JSONL data (the fine-tuning formats).

Each record is encoded exactly as fine-tuning encodes it (:mod:`minituner.hf.data`,
:mod:`minituner.hf.chat`), so the scored tokens are the trained ones: the completion and its EOS
(prompt/completion), every token (text), or the assistant turns with their end-of-turn tokens
(messages). Reported over those tokens: the mean loss, its perplexity and the next-token
accuracy (greedy argmax equals the target). Optionally, exact match: the greedy generation
after the prompt (prompt/completion), or after the conversation before the last assistant turn
(messages), decoded, equals the expected answer decoded from its own tokens, whitespace
normalised; text records have no answer and are left out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.hf.chat import ChatTemplate, chat_prompt_ids, encode_messages, end_of_turn
from minituner.hf.data import encode_record, render_prompt
from minituner.hf.finetune import padding_mask
from minituner.hf.generation import SamplingSettings, generate_ids
from minituner.training.sampling import collate


@dataclass(frozen=True)
class DataRendering:
    """How records become tokens: the chat template of messages records (the run's), and
    whether prompts were rendered as a chat turn (``--chat-template`` runs)."""

    template: ChatTemplate | None = None
    chat_prompts: bool = False


def encode_for_scoring(tokenizer, record: dict, rendering: DataRendering) -> dict:
    """{"ids", "mask"} of one record, as fine-tuning encodes it."""
    if "messages" in record:
        return encode_messages(tokenizer, record["messages"], rendering.template)
    return encode_record(tokenizer, record, rendering.chat_prompts)


def fit_context(sequence: dict, context: int) -> dict | None:
    """The sequence cut to ``context`` inputs, or None when no target token is left."""
    cut = {"ids": sequence["ids"][: context + 1], "mask": sequence["mask"][:context]}
    return cut if any(cut["mask"]) else None


@torch.no_grad()
def token_metrics(model: nn.Module, sequences: list, pad_id: int, batch_size: int = 8) -> dict:
    """{"loss", "perplexity", "token_accuracy", "tokens"} over the masked targets;
    ``model`` is a :class:`minituner.hf.views.ModelView`."""
    total, correct, count = 0.0, 0, 0
    model.eval()
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], pad_id)
        logits = model(batch["input_ids"], attention_mask=padding_mask(batch["target_mask"]))
        mask, targets = batch["target_mask"], batch["targets"]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                                reduction="none")
        total += float(nll[mask].double().sum())
        correct += int((logits.argmax(-1) == targets)[mask].sum())
        count += int(mask.sum())
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"),
            "token_accuracy": correct / count if count else float("nan"), "tokens": count}


def prompt_and_answer(tokenizer, record: dict, rendering: DataRendering) -> tuple | None:
    """(prompt ids, expected answer ids) of a record for exact match; None for text records."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat_prompt_ids(tokenizer, rendering.template, messages[:last])
        answer = messages[last]["content"].strip()
    elif "prompt" in record:
        text, specials = render_prompt(tokenizer, record["prompt"], rendering.chat_prompts)
        prompt = list(tokenizer(text, add_special_tokens=specials)["input_ids"])
        answer = record["completion"]
    else:
        return None
    return prompt, list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def _normal(text: str) -> str:
    return " ".join(text.split())


def exact_match(model: nn.Module, tokenizer, records: list, rendering: DataRendering) -> dict:
    """{"exact_match", "n"}: the share of answerable records whose greedy generation, decoded,
    equals the expected answer (``model``: the transformers model itself)."""
    stop_ids = {tokenizer.eos_token_id}
    if rendering.template is not None:
        end = end_of_turn(tokenizer, rendering.template)
        if end is not None:
            stop_ids.add(tokenizer.convert_tokens_to_ids(end))
    def decode(ids: list) -> str:
        return _normal(tokenizer.decode(ids, skip_special_tokens=True))

    hits, n = 0, 0
    for record in records:
        pair = prompt_and_answer(tokenizer, record, rendering)
        if pair is None:
            continue
        prompt, answer = pair
        settings = SamplingSettings(max_new_tokens=len(answer) + 1)
        generated = generate_ids(model, prompt, settings, stop_ids=stop_ids)[0]
        hits += decode(generated) == decode(answer)
        n += 1
    return {"exact_match": hits / n if n else None, "n": n}
