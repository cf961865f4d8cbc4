"""The evaluation harness: probe scoring, slices, <unk> candidates, control perplexity, and bad
probe files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minituner.course import evaluate as E
from minituner.course.data import encode_completion
from minituner.training.runs import load_model


@pytest.fixture(scope="module")
def base(tiny_base_run):
    model, tokenizer, _ = load_model(tiny_base_run)
    return model.eval(), tokenizer


def write_probes(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def manual_score(model, tokenizer, text: str, prefix_chars: int) -> float:
    """Mean log-prob of the tokens ending after ``prefix_chars``, computed from scratch."""
    encoding = tokenizer.engine.encode(text)
    ids = [tokenizer.bos_id] + encoding.ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    values = [float(logp[i, ids[i + 1]]) for i, (_, end) in enumerate(encoding.offsets)
              if end > prefix_chars]
    return sum(values) / len(values)


def test_scores_match_a_manual_computation(base, tmp_path):
    model, tokenizer = base
    rows = [
        {"prompt": "yesterday he ___ home", "candidates": ["went", "goed"], "answer": "went",
         "slice": "past"},
        {"prompt": "he has ", "candidates": ["eaten bread", "eated bread", "ate bread"],
         "answer": "eaten bread", "slice": "prefix"},
    ]
    probes = E.load_probes(write_probes(tmp_path / "p.jsonl", rows))
    scored = E.score_probes(model, tokenizer, probes)
    for probe, item in zip(probes, scored, strict=True):
        prefix = probe["prompt"].split("___")[0]
        rest = probe["prompt"].split("___")[1] if "___" in probe["prompt"] else ""
        for candidate, score in zip(probe["candidates"], item["scores"], strict=True):
            expected = manual_score(model, tokenizer, prefix + candidate + rest, len(prefix))
            assert score == pytest.approx(expected, abs=1e-5)
        best = max(range(len(item["scores"])), key=item["scores"].__getitem__)
        assert item["prediction"] == probe["candidates"][best]
        answer = item["scores"][probe["candidates"].index(probe["answer"])]
        assert item["correct"] == all(answer > s for c, s in
                                      zip(probe["candidates"], item["scores"], strict=True)
                                      if c != probe["answer"])


def test_bpe_boundary_token_is_part_of_the_candidate(base, tmp_path):
    model, tokenizer = base
    probe = {"prompt": "yesterday he___ home", "candidates": [" went", " goed"],
             "answer": " went", "slice": "edge", "line": 1}
    ids, first = encode_completion(tokenizer, probe["prompt"], " went", eos=False)
    assert tokenizer.engine.id_to_token(ids[first]) == "he "
    score = E.score_probes(model, tokenizer, [probe])[0]["scores"][0]
    expected = manual_score(model, tokenizer, "yesterday he went home", len("yesterday he"))
    assert score == pytest.approx(expected, abs=1e-5)


def test_slices_pool_and_unk_candidates(base, tmp_path):
    model, tokenizer = base
    rows = [{"prompt": "once i ___ here", "candidates": ["was", "beed"], "answer": "was",
             "slice": "a"},
            {"prompt": "once i ___ here", "candidates": ["beed", "was"], "answer": "beed",
             "slice": "a"},
            {"prompt": "he ___ home", "candidates": ["Went", "goed"], "answer": "goed",
             "slice": "b"}]
    probes = E.load_probes(write_probes(tmp_path / "p.jsonl", rows))
    result = E.evaluate_model(model, tokenizer, probes, ["he walks home"])
    assert result["slices"]["a"] == {"accuracy": 0.5, "n": 2}  # the same pair, either way
    assert result["slices"]["b"]["n"] == 1
    assert result["unk_candidates"] == [{"line": 3, "candidate": "Went"}]
    assert E.pooled_accuracy(result["slices"], ("a", "b")) == pytest.approx(
        (1 + result["slices"]["b"]["accuracy"]) / 3)


def test_control_perplexity_counts_eos_not_bos(base):
    model, tokenizer = base
    texts = ["he walks home", "yesterday she played chess"]
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text, bos=True, eos=True)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        total -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1  # every token after <bos>, <eos> included
    assert E.control_perplexity(model, tokenizer, texts) == pytest.approx(
        math.exp(total / count), rel=1e-5)


def test_builtin_probe_sets_load(base):
    probes = E.load_builtin_probes()
    slices = {p["slice"] for p in probes}
    assert {"irregular-past", "irregular-participle", "regular-control"} <= slices
    assert any(s.startswith("misconjugation") for s in slices)
    assert sum(p["slice"] == "irregular-past" for p in probes) == 96


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a ___", "candidates": ["x", "y"], "slice": "s"}, "missing field 'answer'"),
    ({"prompt": "a ___", "candidates": ["x", "y"], "answer": "z", "slice": "s"},
     "answer 'z' is not among the candidates"),
    ({"prompt": "a ___ ___", "candidates": ["x", "y"], "answer": "x", "slice": "s"},
     "at most one ___"),
    ({"prompt": "a", "candidates": ["x"], "answer": "x", "slice": "s"}, "at least two"),
])
def test_bad_probe_files_name_the_line(tmp_path, line, message):
    good = {"prompt": "a ___", "candidates": ["x", "y"], "answer": "x", "slice": "s"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        E.load_probes(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        E.load_probes(path)


def test_control_prompt_completion_scores_from_the_blank_to_eos(base):
    model, tokenizer = base
    record = {"prompt": "yesterday he ___ home", "completion": "walked"}
    sequences = E.control_sequences(tokenizer, [record, {"text": "he walks home"}])
    ids, first = encode_completion(tokenizer, "yesterday he ___ home", "walked")
    assert sequences[0]["ids"] == ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    nll = -sum(float(logp[i - 1, ids[i]]) for i in range(first, len(ids)))  # <eos> included
    whole = tokenizer.encode("he walks home", bos=True, eos=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], dim=-1)
    nll -= sum(float(logp[i, whole[i + 1]]) for i in range(len(whole) - 1))
    count = (len(ids) - first) + (len(whole) - 1)
    assert E.control_perplexity(model, tokenizer, sequences) == pytest.approx(
        math.exp(nll / count), rel=1e-5)
    pair = E.control_sequences(tokenizer, [{"en": "he walks", "es": "él camina"}])
    assert [s["ids"] for s in pair] == [tokenizer.encode(t, bos=True, eos=True)
                                        for t in ("he walks", "él camina")]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "he"}, "needs string fields 'prompt' and 'completion'"),
    ({"words": "he walks"}, "needs 'prompt' and 'completion', 'text', or 'en' and 'es'"),
    (["he walks"], "must be a JSON object"),
])
def test_bad_control_records_name_the_record(base, record, message):
    _, tokenizer = base
    with pytest.raises(ValueError, match="ctl.jsonl: control record 2") as info:
        E.control_sequences(tokenizer, [{"text": "ok"}, record], "ctl.jsonl")
    assert message in str(info.value)
