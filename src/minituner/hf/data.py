"""A user's JSONL fine-tuning data, tokenized for a transformers model.

Each line is a JSON object: ``{"prompt": ..., "completion": ...}``, ``{"text": ...}`` or
``{"messages": [{"role": ..., "content": ...}, ...]}``.

- prompt/completion: ids = tokenizer(prompt) (with the tokenizer's own special tokens, e.g.
  Llama's BOS) + tokenizer(completion, no special tokens) + EOS. The loss covers the completion
  tokens and the EOS, never the prompt. The two parts are tokenized separately, so a completion
  that should follow a space must start with one (GPT-2's BPE glues the space to the word).
  With ``chat_template=True`` the prompt is rendered as one user turn with the tokenizer's
  chat template (generation prompt added) before tokenizing, and the completion is the
  assistant's answer.
- text: ids = tokenizer(text) + EOS; every token counts.
- messages: the conversation rendered with the tokenizer's chat template; the loss covers the
  assistant turns and their end-of-turn tokens only (:mod:`minituner.hf.chat`).

Sequences are lists of ids with one mask flag per target (target i predicts ids[i + 1]), the
layout :func:`minituner.training.sampling.collate` batches. A sequence longer than the model's
context is truncated (and counted, so the caller can warn) or refused with ``strict``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from minituner.hf.chat import check_messages, encode_messages
from minituner.util.jsonl import read_numbered_jsonl


@dataclass
class EncodedData:
    """Sequences ({"ids", "mask"}) plus what was done to fit them into the context."""

    sequences: list
    truncated: list = field(default_factory=list)  # line numbers cut to the context
    dropped: list = field(default_factory=list)  # line numbers left with no target token


def read_examples(path: str | os.PathLike) -> list:
    """(line number, record) of every non-blank line; an invalid line is an error naming it."""
    examples = read_numbered_jsonl(path, "data file")
    for number, record in examples:
        _check_record(record, f"{path}:{number}")
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt/completion, text or "
                         "messages")
    if "messages" in record:
        check_messages(record, where)
        return
    if "text" in record and "prompt" not in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: needs string fields 'prompt' and 'completion' "
                             f"(or 'text'); '{key}' is missing or not a string")
    if not record["completion"]:
        raise ValueError(f"{where}: 'completion' is empty")


def _ids(tokenizer, text: str, specials: bool) -> list:
    return list(tokenizer(text, add_special_tokens=specials)["input_ids"])


def render_prompt(tokenizer, prompt: str, chat_template: bool = False) -> tuple:
    """(text, add_special_tokens): the prompt as the model sees it, plain or as a chat turn."""
    if not chat_template:
        return prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template: the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
    )
    return text, False  # the template writes its own special tokens


def encode_record(tokenizer, record: dict, chat_template: bool = False) -> dict:
    """{"ids", "mask"} of one record (see the module docstring for the rule)."""
    eos = tokenizer.eos_token_id
    if "messages" in record:
        return encode_messages(tokenizer, record["messages"])
    if "prompt" in record:
        text, specials = render_prompt(tokenizer, record["prompt"], chat_template)
        prompt_ids = _ids(tokenizer, text, specials)
        completion_ids = _ids(tokenizer, record["completion"], False) + [eos]
        ids = prompt_ids + completion_ids
        first_target = max(len(prompt_ids) - 1, 0)  # target i predicts ids[i + 1]
        mask = [i >= first_target for i in range(len(ids) - 1)]
    else:
        ids = _ids(tokenizer, record["text"], True) + [eos]
        mask = [True] * (len(ids) - 1)
    return {"ids": ids, "mask": mask}


def encode_examples(
    tokenizer, examples: list, max_len: int, chat_template: bool = False, strict: bool = False,
    where: str = "data",
) -> EncodedData:
    """Encode (line, record) pairs; sequences over ``max_len`` inputs are cut or refused."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    data = EncodedData(sequences=[])
    for number, record in examples:
        sequence = encode_record(tokenizer, record, chat_template)
        if len(sequence["ids"]) < 2:
            raise ValueError(f"{where}:{number}: encodes to fewer than 2 tokens")
        if len(sequence["ids"]) - 1 > max_len:
            if strict:
                raise ValueError(
                    f"{where}:{number}: {len(sequence['ids'])} tokens with EOS, but the model "
                    f"reads at most {max_len} + 1 (drop --strict-len to truncate instead)"
                )
            sequence = {"ids": sequence["ids"][: max_len + 1], "mask": sequence["mask"][:max_len]}
            data.truncated.append(number)
            if not any(sequence["mask"]):
                data.dropped.append(number)
                continue
        data.sequences.append(sequence)
    if not data.sequences:
        raise ValueError(f"{where}: no example keeps a target token within {max_len} tokens")
    return data


def split_validation(examples: list, fraction: float, seed: int) -> tuple:
    """(train, validation) lists: a seeded ``fraction`` of the examples held out (at least 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    if len(examples) < 2:
        raise ValueError("--val-fraction needs at least 2 examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in held]
    validation = [e for i, e in enumerate(examples) if i in held]
    return train, validation
