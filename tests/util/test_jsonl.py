"""util.jsonl: the one JSON Lines reader and writer."""

from __future__ import annotations

import pytest

from minituner.util.jsonl import jsonl_text, read_jsonl, write_jsonl

RECORDS = [{"b": 1, "a": "went"}, {"es": "comió", "en": "ate"}, {}]


def test_text_is_one_sorted_compact_object_per_line():
    assert jsonl_text(RECORDS) == '{"a": "went", "b": 1}\n{"en": "ate", "es": "comió"}\n{}\n'
    assert jsonl_text([]) == ""


def test_write_then_read_round_trips_with_stable_bytes(tmp_path):
    first = write_jsonl(tmp_path / "a" / "x.jsonl", RECORDS)
    again = write_jsonl(tmp_path / "b" / "x.jsonl", [dict(reversed(r.items())) for r in RECORDS])
    assert first.read_bytes() == again.read_bytes() == jsonl_text(RECORDS).encode("utf-8")
    assert read_jsonl(first) == RECORDS
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.jsonl"]  # no temp file left


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_errors_are_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_jsonl(path, what="probe file")
    message = str(error.value)
    assert message.startswith(f"{path}:2: invalid JSON in probe file (") and "\n" not in message
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl: probe file not found$"):
        read_jsonl(tmp_path / "missing.jsonl", what="probe file")
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ValueError, match="x.jsonl:1: JSONL file is not UTF-8 text"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match="x.jsonl:3: JSONL file is not UTF-8 text"):
        read_jsonl(path)
