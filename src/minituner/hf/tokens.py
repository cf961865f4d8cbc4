"""New special tokens (``--add-tokens``): a bigger vocabulary whose new rows train.

The tokens are added to the tokenizer as special tokens before the data is encoded, so the data
may use them. The model's input embedding (and its output head) then gets rows for them:

- the vocabulary grows to ``max(config.vocab_size, len(tokenizer))``. A base whose tokenizer
  fills its embedding (GPT-2, Llama 3) grows by the new tokens; a base with spare rows (Qwen,
  the toy models of :mod:`minituner.hf.toy`) keeps its size and the new tokens take spare rows.
  The embedding is never shrunk.
- every new token's row, in the embedding and in the head, starts as the mean of the rows of
  the tokens the tokenizer had before (ids below its old length): deterministic, and a new
  token starts as an "average" token rather than a random one.
- the input embedding and the output head are trained in full (PEFT's ``modules_to_save``; they
  are added to ``--modules-to-save`` when not named there). A tied head (GPT-2) is trained as
  its own copy too: the saved adapter then holds every row the model uses, so PEFT rebuilds
  exactly the trained model whatever rows its own resize starts from.

What was added is recorded in the base record (``added_tokens``: the tokens, their ids, the
vocabulary size and the rows averaged), which config.json and the adapter carry; the base
fingerprint stays the one of the original base. The run saves the extended tokenizer in its
``adapter/`` folder, as PEFT users save the tokenizer with the adapter. Loading resizes a base
the same way before the adapter is attached (:func:`attach_adapter`); with PEFT::

    tokenizer = AutoTokenizer.from_pretrained("run/adapter")
    base.resize_token_embeddings(record["vocab_size"])  # len(tokenizer) when the base had no
    model = PeftModel.from_pretrained(base, "run/adapter")  # spare rows
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.models import TOKENIZER_FILES, load_hf_tokenizer
from minituner.lora.adapters import load_adapter, verify_adapter_base
from minituner.lora.targets import suffix_matches
from minituner.util.files import atomic_write_bytes

__all__ = ["NEW_ROW_INIT", "add_new_tokens", "adapter_tokenizer", "attach_adapter",
           "embedding_paths", "resize_for_tokens", "save_tokenizer", "token_modules_to_save"]

NEW_ROW_INIT = "mean of the rows of the tokenizer's original tokens"


def add_new_tokens(tokenizer, tokens: Sequence, vocab_size: int, where: str) -> dict:
    """Add ``tokens`` to ``tokenizer`` as special tokens; returns the record of what was added
    (``vocab_size``: the model's before; ``where`` names the tokenizer in errors)."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"--add-tokens: a token must be a non-empty string, got {token!r}")
        if token in vocab:
            raise ValueError(f"--add-tokens: token {token!r} is already in the tokenizer of "
                             f"{where} (id {vocab[token]})")
    original = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)},
                                 replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    return {"tokens": list(tokens), "ids": ids, "vocab_size": max(vocab_size, len(tokenizer)),
            "original_vocab_size": vocab_size, "mean_of_rows": min(original, vocab_size),
            "init": NEW_ROW_INIT}


def embedding_paths(model: nn.Module) -> list:
    """Module paths of the input embedding and the output head (tied or not)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    paths = {id(module): name for name, module in model.named_modules()}
    return [paths[id(module)] for module in wanted if module is not None]


def token_modules_to_save(model: nn.Module, names: Sequence | None) -> list:
    """``names`` plus the embedding and head paths they do not already name."""
    names = list(names or [])
    return names + [path for path in embedding_paths(model)
                    if not any(suffix_matches(path, name) for name in names)]


@torch.no_grad()
def resize_for_tokens(model: nn.Module, record: dict) -> None:
    """Grow the embedding (and head) to ``record["vocab_size"]`` rows and set each new token's
    row to the mean of the original tokens' rows (a tied head follows its embedding)."""
    size, rows, ids = record["vocab_size"], record["mean_of_rows"], record["ids"]
    if model.get_input_embeddings().weight.shape[0] < size:
        with torch.random.fork_rng(devices=[]):  # the rows are overwritten below
            model.resize_token_embeddings(size, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
        if getattr(head, "bias", None) is not None:
            weights.append(head.bias)
    for weight in weights:
        mean = weight[:rows].float().mean(dim=0).to(weight.dtype)
        weight[ids] = mean


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """Write the tokenizer's files into ``directory``, each one atomically."""
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)
        for path in sorted(Path(staging).iterdir()):
            atomic_write_bytes(Path(directory) / path.name, path.read_bytes())


def adapter_tokenizer(adapter_dir: str | os.PathLike, record: dict, base_dir):
    """The tokenizer of an adapter made with new tokens (saved beside it), after checking it
    gives the recorded ids; without new tokens, the base's."""
    added = record.get("added_tokens")
    if not added:
        return load_hf_tokenizer(base_dir)
    adapter_dir = Path(adapter_dir)
    if not any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{adapter_dir}: the adapter added tokens {added['tokens']} but its "
                         f"folder holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    tokenizer = load_hf_tokenizer(adapter_dir)
    ids = tokenizer.convert_tokens_to_ids(list(added["tokens"]))
    if ids != added["ids"]:
        raise ValueError(f"{adapter_dir}: the tokenizer gives {added['tokens']} ids {ids}, the "
                         f"adapter was trained with ids {added['ids']}")
    return tokenizer


def attach_adapter(base: nn.Module, adapter_dir: str | os.PathLike, record: dict,
                   strict: bool = True) -> nn.Module:
    """``base`` with the adapter loaded: the fingerprint is checked on the original base, then
    the vocabulary grows as the run's did (``record["added_tokens"]``), then the adapter is
    attached."""
    added = record.get("added_tokens")
    if not added:
        return load_adapter(base, adapter_dir, strict=strict)
    verify_adapter_base(base, adapter_dir, strict=strict)
    resize_for_tokens(base, added)
    return load_adapter(base, adapter_dir, strict=strict, check_base=False)
