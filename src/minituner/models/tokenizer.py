"""A character-level BPE with exactly 64 tokens, trained on the verb corpus.

A byte-level BPE starts from 256 symbols and cannot fit in 64, so the base alphabet is the
corpus's characters. Hugging Face ``tokenizers`` does the training; the file is wrapped in a
versioned JSON envelope so that a file of another format is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as Engine
from tokenizers import decoders, models, trainers

from minituner.util.files import atomic_write_json, read_json

TOKENIZER_FORMAT = "minituner-char-bpe"
TOKENIZER_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Tokenizer:
    """Encode/decode text with a trained char-level BPE; knows the special token ids."""

    def __init__(self, engine, context_len: int = 32):
        self.engine = engine
        self.context_len = context_len
        ids = [engine.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks a special token; needs {list(SPECIAL_TOKENS)}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids

    @property
    def vocab_size(self) -> int:
        """Number of tokens, specials included."""
        return self.engine.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """Token ids of ``text``, optionally framed by <bos> and <eos>."""
        ids = self.engine.encode(text).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of token ids, special tokens dropped."""
        return self.engine.decode([int(i) for i in ids], skip_special_tokens=True)

    def unknown_chars(self, text: str) -> list:
        """The characters of ``text`` this tokenizer cannot spell (each becomes one <unk>)."""
        encoding = self.engine.encode(text)
        return [text[a:b] for token, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
                if token == self.unk_id]

    def fits(self, text: str) -> bool:
        """True when ``<bos> text <eos>`` fits the model's context."""
        return len(self.encode(text)) + 2 <= self.context_len

    def save(self, path: str | Path) -> Path:
        """Write the versioned JSON file atomically."""
        payload = {
            "format": TOKENIZER_FORMAT,
            "version": TOKENIZER_VERSION,
            "context_len": self.context_len,
            "tokenizer": json.loads(self.engine.to_str()),
        }
        return atomic_write_json(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer file, refusing other formats and versions by name."""
        payload = read_json(path, "tokenizer file")
        if payload.get("format") != TOKENIZER_FORMAT:
            found = payload.get("format")
            raise ValueError(f"{path}: not a minituner tokenizer (format {found!r})")
        if payload.get("version") != TOKENIZER_VERSION:
            raise ValueError(
                f"{path}: tokenizer version {payload.get('version')!r} is not supported "
                f"(this minituner reads version {TOKENIZER_VERSION})"
            )
        engine = Engine.from_str(json.dumps(payload["tokenizer"]))
        return cls(engine, payload.get("context_len", 32))


def train_tokenizer(texts: list, vocab_size: int = 64, context_len: int = 32) -> Tokenizer:
    """Train a char-level BPE on ``texts`` to exactly ``vocab_size`` tokens."""
    alphabet = sorted({ch for text in texts for ch in text})
    if len(alphabet) + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {len(alphabet)} characters "
            f"plus {len(SPECIAL_TOKENS)} special tokens"
        )
    engine = Engine(models.BPE(unk_token="<unk>"))
    engine.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        min_frequency=1,
        show_progress=False,
    )
    engine.train_from_iterator(texts, trainer=trainer)
    if engine.get_vocab_size() != vocab_size:
        raise ValueError(
            f"BPE training stopped at {engine.get_vocab_size()} tokens, not {vocab_size}: "
            "the corpus is too small for that many merges"
        )
    return Tokenizer(engine, context_len)
