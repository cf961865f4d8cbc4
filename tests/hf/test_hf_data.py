"""User JSONL data for transformers models: records, masks, chat template, lengths, splits."""

from __future__ import annotations

import json

import pytest

from minituner.hf import load_hf_tokenizer
from minituner.hf.data import encode_examples, encode_record, read_examples, split_validation


@pytest.fixture(scope="module")
def tokenizer(toy_hf_model):
    return load_hf_tokenizer(toy_hf_model("gpt2"))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def test_prompt_completion_mask_covers_completion_and_eos(tokenizer):
    record = {"prompt": "the cat", "completion": "saw a dog"}
    sequence = encode_record(tokenizer, record)
    prompt_ids = tokenizer("the cat")["input_ids"]
    completion_ids = tokenizer("saw a dog", add_special_tokens=False)["input_ids"]
    assert sequence["ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    targets = sequence["ids"][1:]
    scored = [t for t, m in zip(targets, sequence["mask"], strict=True) if m]
    assert scored == completion_ids + [tokenizer.eos_token_id]  # prompt never scored


def test_text_record_scores_every_token(tokenizer):
    sequence = encode_record(tokenizer, {"text": "a red bird"})
    assert sequence["ids"][-1] == tokenizer.eos_token_id
    assert all(sequence["mask"]) and len(sequence["mask"]) == len(sequence["ids"]) - 1


def test_chat_template_renders_the_prompt(tokenizer):
    plain = encode_record(tokenizer, {"prompt": "the cat", "completion": "ate"})
    chat = encode_record(tokenizer, {"prompt": "the cat", "completion": "ate"}, chat_template=True)
    user, assistant = tokenizer.convert_tokens_to_ids(["<user>", "<assistant>"])
    assert chat["ids"][0] == user and assistant in chat["ids"] and user not in plain["ids"]
    assert sum(chat["mask"]) == sum(plain["mask"]) == 2  # "ate" and EOS either way


def test_invalid_lines_are_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, "", "{oops"])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: invalid JSON"):
        read_examples(path)
    write_jsonl(path, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: needs string fields"):
        read_examples(path)
    write_jsonl(path, [{"text": ""}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: 'text' must be"):
        read_examples(path)
    write_jsonl(path, [[1, 2]])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
        read_examples(path)
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"d\.jsonl:1: data file is not UTF-8 text"):
        read_examples(path)


def test_long_sequences_truncate_or_refuse(tmp_path, tokenizer):
    long_text = " ".join(["the cat saw a dog"] * 10)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "red"}, {"text": long_text},
        {"prompt": long_text, "completion": "dog"},
    ])
    examples = read_examples(path)
    data = encode_examples(tokenizer, examples, max_len=16, where="d.jsonl")
    assert data.truncated == [2, 3] and data.dropped == [3]  # line 3 keeps no target
    assert len(data.sequences) == 2
    assert all(len(s["ids"]) - 1 <= 16 for s in data.sequences)
    refused = r"d\.jsonl:2: 51 tokens with EOS, but the model reads at most 16 \+ 1"
    with pytest.raises(ValueError, match=refused):
        encode_examples(tokenizer, examples, max_len=16, strict=True, where="d.jsonl")


def test_validation_split_is_seeded_and_disjoint():
    examples = [(i, {"text": f"w{i}"}) for i in range(20)]
    train, val = split_validation(examples, 0.25, seed=3)
    again = split_validation(examples, 0.25, seed=3)
    assert (train, val) == again and len(val) == 5 and len(train) == 15
    assert not {n for n, _ in train} & {n for n, _ in val}
    with pytest.raises(ValueError, match="--val-fraction"):
        split_validation(examples, 1.5, seed=0)
