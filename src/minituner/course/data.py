"""Fine-tuning data: the irregular-verb SFT set, the regular-verb control set, user JSONL files,
and the token-level encoding shared by training and scoring.

The SFT set holds fill-in-the-blank examples of the 8 irregular verbs in past simple and past
participle: ``{"prompt": "yesterday he ___ home", "completion": "went", ...}``. Every English
example carries its Spanish pair (``"pair"``), and the Spanish line is also an example of its own
(same ``pair_id``). The split is by sentence frame (``"past:3"``): 8 of the 10 frames of each
tense train, one validates and one tests, so no test frame ever appears in training.

The control set holds regular-verb lines of every tense (past forms included) from the base's
held-out pretraining test split; it measures forgetting (control perplexity) and never trains.

Encoding rule (training and probe scoring use the same one): a prompt with ``___`` is filled with
the completion, otherwise the completion is appended. The text is tokenised as one string; the
*completion tokens* are every token that ends after the prompt's prefix (the text before the
blank), so a BPE token that straddles the boundary counts as completion. <eos> is a completion
token too; <bos> never is.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minituner.course import corpus
from minituner.course import verbs as V
from minituner.util.jsonl import read_numbered_jsonl

BLANK = "___"
BLANK_TENSES = ("past", "participle")
SPLITS = ("train", "validation", "test")
EXAMPLES_PER_CELL = 3  # English sentences per (verb, tense, frame): 8 x 20 x 3 = 480
CONTROL_SIZE = 80
FRAME_SPLIT_SEED = 0  # fixed, so the committed probe files always hold the test frames


def split_frames(seed: int = FRAME_SPLIT_SEED) -> dict:
    """{"train"|"validation"|"test": sorted frame keys}; per tense 8 / 1 / 1 of 10 frames."""
    rng = random.Random(seed)
    out = {name: [] for name in SPLITS}
    for tense in BLANK_TENSES:
        order = list(range(len(corpus.FRAMES[tense])))
        rng.shuffle(order)
        out["test"].append(f"{tense}:{order[0]}")
        out["validation"].append(f"{tense}:{order[1]}")
        out["train"].extend(f"{tense}:{i}" for i in order[2:])
    return {name: sorted(keys) for name, keys in out.items()}


def blank_pair(record: dict) -> dict:
    """English and Spanish blank frames of a corpus record, with their answers."""
    frame_index = int(record["frame"].split(":")[1])
    args = (record["verb"], record["tense"], record["person"], frame_index, record["complement"])
    blanked = corpus.render(*args, en_form=BLANK, es_form=BLANK)
    return {
        "en": {"prompt": blanked.en, "completion": corpus.english_form(*args[:3])},
        "es": {"prompt": blanked.es, "completion": corpus.spanish_form(*args[:3])},
    }


def fill(prompt: str, completion: str) -> tuple:
    """(prefix, full text): the blank filled with ``completion``, or it appended to a prefix."""
    if prompt.count(BLANK) > 1:
        raise ValueError(f"prompt has more than one {BLANK} blank: {prompt!r}")
    if BLANK in prompt:
        prefix, rest = prompt.split(BLANK, 1)
        return prefix, prefix + completion + rest
    return prompt, prompt + completion


def completion_span(tokenizer, prompt: str, completion: str, eos: bool = True) -> tuple:
    """(token ids with <bos> [and <eos>], first completion index, end of the completion).

    Token ``i`` of the filled text is a completion token when its character span overlaps the
    completion's characters: a BPE merge across either edge of the blank moves that token into
    the completion, so every completion character is covered. Indices count <bos>.
    """
    if not completion:
        raise ValueError("completion must not be empty")
    prefix, text = fill(prompt, completion)
    start_char, end_char = len(prefix), len(prefix) + len(completion)
    encoding = tokenizer.engine.encode(text)
    inside = [i for i, (a, b) in enumerate(encoding.offsets) if b > start_char and a < end_char]
    ids = [tokenizer.bos_id] + list(encoding.ids) + ([tokenizer.eos_id] if eos else [])
    return ids, inside[0] + 1, inside[-1] + 2


def encode_completion(tokenizer, prompt: str, completion: str, eos: bool = True) -> tuple:
    """(token ids with <bos> [and <eos>], index of the first completion token)."""
    ids, first, _ = completion_span(tokenizer, prompt, completion, eos)
    return ids, first


def completion_sequence(tokenizer, prompt: str, completion: str) -> dict:
    """One training sequence: ids and a per-target mask from the blank to the end, <eos> included.

    For a blank frame the completion's tokens *and the rest of the sentence* carry the loss
    ("went home <eos>" in "yesterday he ___ home"): the model must learn to go on normally after
    a form it never saw in pretraining (with the loss on the filled word alone, held-out frames
    scored 0.4-0.5 instead of 0.8-0.9). The prefix and <bos> carry none.
    """
    ids, first, _ = completion_span(tokenizer, prompt, completion)
    if len(ids) > tokenizer.context_len:
        raise ValueError(
            f"example {_shown(prompt)} -> {_shown(completion)} is {len(ids)} tokens with "
            f"<bos>/<eos>; the context holds {tokenizer.context_len}"
        )
    mask = [i + 1 >= first for i in range(len(ids) - 1)]  # target i predicts ids[i + 1]
    return {"ids": ids, "mask": mask}


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (never a 10 KB echo)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def text_sequence(tokenizer, text: str) -> dict:
    """A whole line (<bos> text <eos>); every target counts (replay, control)."""
    ids = tokenizer.encode(text, bos=True, eos=True)
    return {"ids": ids, "mask": [True] * (len(ids) - 1)}


def _fits(tokenizer, example: dict) -> bool:
    try:
        completion_sequence(tokenizer, example["prompt"], example["completion"])
    except ValueError:
        return False
    return True


def fold_frames(fold: int) -> dict:
    """Frame cross-validation fold ``fold`` (0-9): frame ``fold`` of each tense tests, frame
    ``fold + 1`` (mod 10) validates, the other 8 train."""
    count = len(corpus.FRAMES["past"])
    if not 0 <= fold < count:
        raise ValueError(f"fold must be in 0..{count - 1}, got {fold}")
    test = [f"{t}:{fold}" for t in BLANK_TENSES]
    validation = [f"{t}:{(fold + 1) % count}" for t in BLANK_TENSES]
    train = [f"{t}:{i}" for t in BLANK_TENSES for i in range(count)
             if f"{t}:{i}" not in test + validation]
    return {"train": sorted(train), "validation": validation, "test": test}


def build_sft_set(irregular_records: list, tokenizer, seed: int = FRAME_SPLIT_SEED,
                  frames: dict | None = None) -> dict:
    """The irregular-verb SFT examples by split ({"train": [...], ...}), English + Spanish.

    For each verb, tense and frame, ``EXAMPLES_PER_CELL`` person/complement combinations are
    drawn (seeded) among those whose English and Spanish sequences fit the context. ``frames``
    (default :func:`split_frames`) says which split each frame goes to; the examples drawn do
    not depend on it.
    """
    frames = frames or split_frames(seed)
    split_of = {frame: name for name, keys in frames.items() for frame in keys}
    cells: dict = {}
    for record in irregular_records:
        if record["tense"] in BLANK_TENSES and V.is_irregular(record["verb"]):
            cells.setdefault((record["verb"], record["frame"]), []).append(record)
    rng = random.Random(seed)
    out = {name: [] for name in SPLITS}
    pair_id = 0
    for key in sorted(cells, key=lambda k: (V.IRREGULAR_VERBS.index(k[0]), k[1])):
        candidates = sorted(cells[key], key=lambda r: (r["person"], r["complement"]))
        rng.shuffle(candidates)
        taken = 0
        for record in candidates:
            if taken == EXAMPLES_PER_CELL:
                break
            pair = blank_pair(record)
            if not all(_fits(tokenizer, pair[lang]) for lang in ("en", "es")):
                continue
            split = split_of[record["frame"]]
            meta = {k: record[k] for k in ("verb", "tense", "person", "frame", "complement")}
            for lang, other in (("en", "es"), ("es", "en")):
                out[split].append({
                    **pair[lang], "lang": lang, "pair_id": pair_id, "pair": pair[other],
                    "split": split, **meta,
                })
            pair_id += 1
            taken += 1
    return out


def build_control_set(test_records: list, size: int = CONTROL_SIZE,
                      seed: int = FRAME_SPLIT_SEED) -> list:
    """Regular-verb records of every tense (round-robin over tenses, seeded) for forgetting."""
    by_tense: dict = {}
    for record in sorted(test_records, key=lambda r: (r["en"], r["es"])):
        if not V.is_irregular(record["verb"]):
            by_tense.setdefault(record["tense"], []).append(record)
    rng = random.Random(seed)
    for records in by_tense.values():
        rng.shuffle(records)
    chosen, tenses = [], [t for t in corpus.TENSES if t in by_tense]
    while len(chosen) < size and any(by_tense[t] for t in tenses):
        for tense in tenses:
            if by_tense[tense] and len(chosen) < size:
                chosen.append(by_tense[tense].pop())
    return chosen


def control_texts(records: list, source: str = "control set") -> list:
    """Control lines: a record's "text", or its English and Spanish lines (``source``, e.g. the
    file's path, starts any error message)."""
    texts = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: control record {number} must be a JSON object with "
                             f"'text' or 'en' and 'es', got {type(record).__name__}")
        if isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record.get("en"), str) and isinstance(record.get("es"), str):
            texts.extend((record["en"], record["es"]))
        else:
            raise ValueError(f"{source}: control record {number} needs 'text' or 'en' and 'es'")
    return texts


class UserExample(dict):
    """A record of a user's file that remembers where it came from (``source``: "file:line"),
    so a later error names the line the user can open; it serialises like a plain dict."""

    source: str = ""


def load_user_examples(path: str | Path) -> list:
    """A user's {"prompt", "completion"} JSONL, checked line by line (errors name file:line)."""
    numbered = read_numbered_jsonl(path, what="examples file")
    if not numbered:
        raise ValueError(f"{path}: no examples")
    records = []
    for number, record in numbered:
        for key in ("prompt", "completion"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(f"{path}:{number}: missing string field '{key}'")
        if not record["completion"]:
            raise ValueError(f"{path}:{number}: 'completion' is empty")
        example = UserExample(record)
        example.source = f"{path}:{number}"
        records.append(example)
    return records


def split_user_examples(records: list, seed: int) -> dict:
    """80/10/10 of a user file: by "frame" when every record has one, else by line (seeded)."""
    keys = [r.get("frame") for r in records]
    groups = sorted(set(keys)) if all(isinstance(k, str) for k in keys) else None
    units = groups or list(range(len(records)))
    order = list(units)
    random.Random(seed).shuffle(order)
    n_test = n_val = max(1, len(order) // 10) if len(order) >= 3 else 0
    cut = {"test": set(order[:n_test]), "validation": set(order[n_test:n_test + n_val])}
    out = {name: [] for name in SPLITS}
    for index, record in enumerate(records):
        unit = record["frame"] if groups else index
        split = next((name for name, members in cut.items() if unit in members), "train")
        out[split].append(record)
    return out


def sequences_of(examples: list, tokenizer, where: str = "examples") -> list:
    """Encoded training sequences of examples, naming the example that does not fit."""
    out = []
    for number, example in enumerate(examples, start=1):
        try:
            out.append(completion_sequence(tokenizer, example["prompt"], example["completion"]))
        except ValueError as exc:
            source = getattr(example, "source", "")
            raise ValueError(f"{source}: {exc}" if source else f"{where} example {number}: {exc}"
                             ) from None
    return out


MOSTLY_UNK = 0.5  # a completion with more than this share of <unk> tokens is refused


@dataclass
class UnkReport:
    """What of a user's examples the tokenizer cannot spell: examples and characters that map
    to <unk>, and the completions that are mostly <unk> (the first one named by file:line)."""

    examples: int = 0  # examples with at least one <unk>
    characters: int = 0  # characters that map to <unk>, prompts and completions together
    total_examples: int = 0
    shown: list = field(default_factory=list)  # a few distinct unknown characters
    first_source: str = ""  # where the first example with an <unk> is
    mostly_unk: int = 0  # completions with more than MOSTLY_UNK of their tokens <unk>
    first_mostly_unk: str = ""  # "file:line: 3 of 4 completion tokens are <unk>"

    def to_dict(self) -> dict:
        """Plain dict, for results.json."""
        return asdict(self)


def completion_unk_share(tokenizer, prompt: str, completion: str) -> tuple:
    """(<unk> tokens, tokens) of the completion's span (<eos> not counted)."""
    ids, first, end = completion_span(tokenizer, prompt, completion, eos=False)
    span = ids[first:end]
    return sum(token == tokenizer.unk_id for token in span), len(span)


def _where(example, number: int, where: str) -> str:
    return getattr(example, "source", "") or f"{where} example {number}"


def count_unk(examples: list, tokenizer, where: str = "examples") -> UnkReport:
    """Count the examples and characters of ``examples`` that map to <unk>, in file order."""
    report = UnkReport(total_examples=len(examples))
    for number, example in enumerate(examples, start=1):
        unknown = tokenizer.unknown_chars(fill(example["prompt"], example["completion"])[1])
        if not unknown:
            continue
        report.examples += 1
        report.characters += len(unknown)
        report.first_source = report.first_source or _where(example, number, where)
        report.shown += [ch for ch in dict.fromkeys(unknown) if ch not in report.shown]
        report.shown = report.shown[:8]
        unk, tokens = completion_unk_share(tokenizer, example["prompt"], example["completion"])
        if unk > MOSTLY_UNK * tokens:
            report.mostly_unk += 1
            report.first_mostly_unk = report.first_mostly_unk or (
                f"{_where(example, number, where)}: {unk} of {tokens} completion tokens are <unk>")
    return report


def refuse_mostly_unk(report: UnkReport, allow: bool) -> None:
    """Refuse completions that are mostly <unk> (training would teach the model to say <unk>)
    unless ``allow`` (--allow-unk), naming the first one's file:line."""
    if report.mostly_unk and not allow:
        raise ValueError(
            f"{report.first_mostly_unk} (the Mini-GPT tokenizer cannot spell "
            f"{''.join(report.shown)!r}; {report.mostly_unk} completion(s) like it): "
            "--allow-unk trains on them anyway")
