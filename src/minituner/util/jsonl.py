"""JSON Lines, the one reader and writer: one compact JSON object per line, keys sorted.

Every ``*.jsonl`` file minituner writes (corpus splits, probe sets, prepared fine-tuning data,
training logs) goes through :func:`write_jsonl`, so the same records always give the same
bytes; every one it reads goes through :func:`read_jsonl`, whose errors are one line naming
the file (and the line number of a broken record).
"""

from __future__ import annotations

import json
from pathlib import Path

from minituner.util.files import atomic_write_text


def jsonl_text(records: list) -> str:
    """The records as JSON Lines text: one compact object per line, keys sorted (stable bytes)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def write_jsonl(path: str | Path, records: list) -> Path:
    """Atomically write the records as JSON Lines (see :func:`jsonl_text`); returns the path."""
    return atomic_write_text(path, jsonl_text(records))


def read_numbered_jsonl(path: str | Path, what: str = "JSONL file") -> list:
    """(line number, record) of every non-blank line of a JSON Lines file; a missing file, text
    that is not UTF-8 or a line that is not JSON is a one-line error naming ``what``, the file
    and the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: {what} is not UTF-8 text ({exc.reason})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON in {what} ({exc.msg})") from None
    return records


def read_jsonl(path: str | Path, what: str = "JSONL file") -> list:
    """Every record of a JSON Lines file (blank lines skipped), with
    :func:`read_numbered_jsonl`'s one-line errors."""
    return [record for _, record in read_numbered_jsonl(path, what)]
