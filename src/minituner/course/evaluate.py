"""The evaluation harness: fill-in-the-blank probes, accuracy per slice, control perplexity.

Probe file: one JSON object per line,
``{"prompt": "yesterday he ___ home", "candidates": ["went", "goed"], "answer": "went",
"slice": "irregular-past"}``. The prompt holds one ``___`` for the blank, or is a prefix when it
has none (the candidate is appended).

Scoring: each candidate is filled into the blank and the whole sentence is tokenised as one
string (after <bos>). The scored span is every token from the blank to the end of the filled
sentence (candidate + rest of the sentence, no <eos>); the score is the mean log-probability per
scored token. BPE merges can cross the blank's left edge (a token holding the prefix's last
characters and the candidate's first): such a token counts as scored and the context is the
tokens that lie wholly in the prefix, so every character of the candidate is scored. The
prediction is the highest score; a probe is correct only when its answer beats every other
candidate strictly (a tie is wrong). Candidates that tokenise to <unk> are reported.

Control perplexity: exp of the mean next-token NLL per scored token. A text control line
(<bos> line <eos>) scores every predicted token, <eos> included, <bos> never predicted; a
prompt/completion record scores the completion's tokens (from the blank to <eos>), as in
fine-tuning. The loop is :func:`minituner.training.evaluation.masked_nll_sum`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from minituner.course.data import (
    BLANK,
    completion_sequence,
    encode_completion,
    text_sequence,
)
from minituner.training.evaluation import perplexity, summed_nll
from minituner.training.sampling import collate
from minituner.util.jsonl import read_jsonl

BUILTIN_PROBES = ("irregular_past", "irregular_participle", "regular_control", "misconjugation",
                  "form_choice", "new_shapes", "spanish", "validation_frames")
BUILTIN_CONTROL = "control_set"  # probes/control_set.jsonl: control lines, not probes
IRREGULAR_SLICES = ("irregular-past", "irregular-participle")
REGULAR_SLICE = "regular-control"
REQUIRED_FIELDS = ("prompt", "candidates", "answer", "slice")
SLICE_GROUPS = {  # pooled accuracy name -> slices (the harder slices of course/slices.py)
    "form_choice": ("form-choice-past", "form-choice-participle"),
    "new_shape_irregular": ("new-shape-irregular",),
    "new_shape_regular": ("new-shape-regular",),
    "spanish_irregular": ("es-irregular-past", "es-irregular-participle"),
    "spanish_form_choice": ("es-form-choice",),
    "spanish_new_shape_irregular": ("es-new-shape-irregular",),
    "spanish_new_shape_regular": ("es-new-shape-regular",),
    "validation_irregular": ("val-irregular-past", "val-irregular-participle"),
}


def builtin_path(name: str) -> Path:
    """Path of a probe or control file shipped in the package (src/minituner/probes)."""
    return Path(str(resources.files("minituner.course") / "probes" / f"{name}.jsonl"))


def check_probe(record, where: str) -> dict:
    """A validated probe, or a ValueError naming ``where`` (file:line) and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a probe must be a JSON object")
    for field in REQUIRED_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing field '{field}'")
    prompt, candidates, answer = record["prompt"], record["candidates"], record["answer"]
    if not isinstance(prompt, str) or prompt.count(BLANK) > 1:
        raise ValueError(f"{where}: 'prompt' must be a string with at most one {BLANK}")
    if (not isinstance(candidates, list) or len(candidates) < 2
            or not all(isinstance(c, str) and c for c in candidates)):
        raise ValueError(f"{where}: 'candidates' must list at least two non-empty strings")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"{where}: 'candidates' has duplicates")
    if answer not in candidates:
        raise ValueError(f"{where}: answer {answer!r} is not among the candidates {candidates}")
    if not isinstance(record["slice"], str) or not record["slice"]:
        raise ValueError(f"{where}: 'slice' must be a non-empty string")
    return record


def load_probes(path: str | Path) -> list:
    """Read and validate a probe file; errors name the line number."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no probes")
    numbered = []
    with open(path, encoding="utf-8") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    for number, record in zip(numbers, records, strict=True):
        numbered.append({**check_probe(record, f"{path}:{number}"), "line": number})
    return numbered


def load_builtin_probes(names=BUILTIN_PROBES) -> list:
    """The shipped probe sets, concatenated."""
    return [probe for name in names for probe in load_probes(builtin_path(name))]


@torch.no_grad()
def sequence_logprobs(model, sequences: list, pad_id: int, batch_size: int = 256) -> list:
    """Per-sequence list of log p(token_t | tokens_<t) for t = 1..len-1, in batches."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = collate(chunk, pad_id)
        logits = model(batch["input_ids"]).float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        out.extend(picked[row, : len(seq) - 1].tolist() for row, seq in enumerate(chunk))
    model.train(was_training)
    return out


def candidate_sequences(tokenizer, probe: dict) -> list:
    """(token ids, first scored index) for each candidate of a probe."""
    items = []
    for candidate in probe["candidates"]:
        ids, first = encode_completion(tokenizer, probe["prompt"], candidate, eos=False)
        if len(ids) > tokenizer.context_len:
            raise ValueError(
                f"probe line {probe.get('line', '?')}: {candidate!r} filled in gives "
                f"{len(ids)} tokens with <bos>; the context holds {tokenizer.context_len}"
            )
        items.append((ids, first))
    return items


def score_probes(model, tokenizer, probes: list) -> list:
    """Per probe: mean log-prob per scored token of each candidate, and the prediction."""
    plans = [candidate_sequences(tokenizer, probe) for probe in probes]
    flat = [ids for plan in plans for ids, _ in plan]
    logprobs = iter(sequence_logprobs(model, flat, tokenizer.pad_id))
    scored = []
    for probe, plan in zip(probes, plans, strict=True):
        scores = []
        for _ids, first in plan:
            values = next(logprobs)[first - 1 :]  # target t-1 predicts token t
            scores.append(sum(values) / len(values) if values else float("-inf"))
        answer_score = scores[probe["candidates"].index(probe["answer"])]
        others = [s for c, s in zip(probe["candidates"], scores, strict=True)
                  if c != probe["answer"]]
        best = max(range(len(scores)), key=lambda i: scores[i])
        scored.append({
            "slice": probe["slice"], "scores": scores,
            "prediction": probe["candidates"][best],
            "correct": all(answer_score > s for s in others),
        })
    return scored


def unk_candidates(tokenizer, probes: list) -> list:
    """Candidates that contain <unk> once tokenised: {"line", "candidate"} each."""
    found = []
    for probe in probes:
        for candidate in probe["candidates"]:
            if tokenizer.unk_id in tokenizer.encode(candidate):
                found.append({"line": probe.get("line"), "candidate": candidate})
    return found


def slice_accuracy(scored: list) -> dict:
    """{slice: {"accuracy", "n"}} in slice-name order."""
    slices: dict = {}
    for item in scored:
        slices.setdefault(item["slice"], []).append(item["correct"])
    return {name: {"accuracy": sum(v) / len(v), "n": len(v)} for name, v in sorted(slices.items())}


def pooled_accuracy(slices: dict, names) -> float | None:
    """Accuracy over the union of the named slices (None when none is present)."""
    picked = [slices[n] for n in names if n in slices]
    total = sum(s["n"] for s in picked)
    if not total:
        return None
    return sum(s["accuracy"] * s["n"] for s in picked) / total


def control_sequences(tokenizer, records: list, source: str = "control set") -> list:
    """Encoded control records: a prompt/completion record scores its completion tokens, a
    "text" record (or an "en"/"es" pair) every token of its line(s)."""
    sequences = []
    for number, record in enumerate(records, start=1):
        where = f"{source}: control record {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
        if "prompt" in record or "completion" in record:
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
                raise ValueError(f"{where} needs string fields 'prompt' and 'completion' (non-"
                                 "empty)")
            try:
                sequences.append(completion_sequence(tokenizer, prompt, completion))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        elif isinstance(record.get("text"), str):
            sequences.append(text_sequence(tokenizer, record["text"]))
        elif isinstance(record.get("en"), str) and isinstance(record.get("es"), str):
            sequences += [text_sequence(tokenizer, record[k]) for k in ("en", "es")]
        else:
            raise ValueError(f"{where} needs 'prompt' and 'completion', 'text', or 'en' and "
                             "'es'")
    return sequences


def sequences_perplexity(model, sequences: list, pad_id: int, batch_size: int = 128) -> float:
    """exp(mean NLL per scored token) of encoded sequences ({"ids", "mask"} each)."""
    if not sequences:
        raise ValueError("control set is empty")
    return perplexity(*summed_nll(model, sequences, pad_id, batch_size=batch_size))


def control_perplexity(model, tokenizer, control: list, batch_size: int = 128) -> float:
    """Control perplexity of text lines (<eos> predicted and counted, <bos> not) or of
    sequences from :func:`control_sequences` (a list may mix both)."""
    if not control:
        raise ValueError("control set is empty")
    sequences = [text_sequence(tokenizer, item) if isinstance(item, str) else item
                 for item in control]
    return sequences_perplexity(model, sequences, tokenizer.pad_id, batch_size)


def evaluate_model(model, tokenizer, probes: list, control: list) -> dict:
    """Slices, <unk> candidates, control perplexity, and pooled irregular/regular accuracy.

    ``probes`` may be empty (no slices); ``control`` holds text lines or encoded sequences
    (see :func:`control_perplexity`).
    """
    slices = slice_accuracy(score_probes(model, tokenizer, probes)) if probes else {}
    return {
        "slices": slices,
        "unk_candidates": unk_candidates(tokenizer, probes),
        "control_ppl": control_perplexity(model, tokenizer, control),
        "irregular_accuracy": pooled_accuracy(slices, IRREGULAR_SLICES),
        "regular_accuracy": pooled_accuracy(slices, (REGULAR_SLICE,)),
        "groups": {name: pooled_accuracy(slices, names) for name, names in SLICE_GROUPS.items()},
    }
