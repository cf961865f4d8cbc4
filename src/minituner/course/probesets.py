"""The built-in probe sets and control set, generated deterministically from the seed-0 corpus.

The committed files in ``src/minituner/course/probes/`` (package data) are exactly what
:func:`write_builtin_files` writes (a test regenerates and compares them); regenerate with
``python -m minituner.course.probesets src/minituner/course/probes``.

- irregular_past / irregular_participle: every line of the held-out *test* frames (one frame
  per tense, never in the SFT training or validation split): correct form vs the
  over-regularised one (went / goed, eaten / eated).
- regular_control: the control set's English lines, correct form vs a wrong one of the same
  verb (walked / walk in the past, walks / walk for he/she, walk / walks otherwise, walk /
  walked after "can" and "will").
- misconjugation: whole-sentence detection (prompt ``___``): a correct line vs its labelled
  wrong twin, over-regularised pasts of the test frames and missing third-person -s lines of
  the pretraining test split.
- form_choice, new_shapes, spanish, validation_frames: the harder slices of
  :mod:`minituner.course.slices` (how each is built and why it is held out is documented
  there).
- control_set: regular-verb records of every tense from the pretraining test split.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from minituner.course import verbs as V
from minituner.course.data import BLANK, blank_pair, build_control_set, split_frames
from minituner.course.pretraining import build_corpus
from minituner.course.slices import (
    form_choice_probes,
    new_shape_probes,
    spanish_test_probes,
    wrong_regular_form,
)
from minituner.models.tokenizer import Tokenizer
from minituner.util.jsonl import read_jsonl, write_jsonl


def _ordered(correct: str, wrong: str, rng: random.Random) -> list:
    pair = [correct, wrong]
    rng.shuffle(pair)
    return pair


def irregular_probes(irregular_records: list, tense: str, seed: int = 0,
                     split: str = "test", frames=None, prefix: str = "") -> list:
    """Blank probes for every irregular line of the ``split`` frames (or of ``frames``) of
    ``tense``; slices are named ``<prefix>irregular-<tense>`` (the validation frames give
    probes for choosing settings without looking at the test frames)."""
    test_frames = set(frames or split_frames()[split])
    rng = random.Random(f"{seed}:{tense}")
    probes = []
    for record in irregular_records:
        if record["tense"] != tense or record["frame"] not in test_frames:
            continue
        pair = blank_pair(record)["en"]
        wrong = V.overregularised_past(record["verb"])
        probes.append({
            "prompt": pair["prompt"], "candidates": _ordered(pair["completion"], wrong, rng),
            "answer": pair["completion"], "slice": f"{prefix}irregular-{tense}",
            "verb": record["verb"], "person": record["person"], "frame": record["frame"],
        })
    return probes


def regular_probes(control_records: list, seed: int = 0) -> list:
    """Blank probes for the control set's English lines (every tense)."""
    rng = random.Random(f"{seed}:regular")
    probes = []
    for record in control_records:
        pair = blank_pair(record)["en"]
        wrong = wrong_regular_form(record["verb"], record["tense"], record["person"])
        probes.append({
            "prompt": pair["prompt"], "candidates": _ordered(pair["completion"], wrong, rng),
            "answer": pair["completion"], "slice": "regular-control",
            "verb": record["verb"], "tense": record["tense"], "frame": record["frame"],
        })
    return probes


def misconjugation_probes(mis_records: list, test_records: list, seed: int = 0) -> list:
    """Whole-sentence probes: a correct line against its labelled wrong twin."""
    test_frames = set(split_frames()["test"])
    held_out_lines = {r["en"] for r in test_records}
    rng = random.Random(f"{seed}:misconjugation")
    probes = []
    for record in mis_records:
        if record["kind"].startswith("overregularised-"):
            keep, name = record["frame"] in test_frames, "misconjugation-overregularised"
        else:
            keep, name = record["en"] in held_out_lines, "misconjugation-third-person-s"
        if keep:
            probes.append({
                "prompt": BLANK, "candidates": _ordered(record["en"], record["en_wrong"], rng),
                "answer": record["en"], "slice": name, "verb": record["verb"],
            })
    return probes


def builtin_sets(corpus_dir: str | Path) -> dict:
    """{file stem: records} of every built-in file, from a corpus folder."""
    folder = Path(corpus_dir)
    irregular = read_jsonl(folder / "irregular.jsonl")
    test = read_jsonl(folder / "test.jsonl")
    control = build_control_set(test)
    tokenizer = (Tokenizer.load(folder / "tokenizer.json")
                 if (folder / "tokenizer.json").is_file() else None)
    validation = [probe for tense in ("past", "participle")
                  for probe in irregular_probes(irregular, tense, split="validation",
                                                prefix="val-")]
    return {
        "irregular_past": irregular_probes(irregular, "past"),
        "irregular_participle": irregular_probes(irregular, "participle"),
        "regular_control": regular_probes(control),
        "misconjugation": misconjugation_probes(
            read_jsonl(folder / "misconjugations.jsonl"), test),
        "form_choice": form_choice_probes(irregular, tokenizer=tokenizer),
        "new_shapes": new_shape_probes(tokenizer=tokenizer),
        "spanish": spanish_test_probes(irregular, tokenizer=tokenizer),
        "validation_frames": validation,
        "control_set": control,
    }


def write_builtin_files(out_dir: str | Path, corpus_dir: str | Path | None = None) -> dict:
    """Write the built-in files (from a fresh seed-0 corpus unless ``corpus_dir`` is given)."""
    with tempfile.TemporaryDirectory() as tmp:
        if corpus_dir is None:
            build_corpus(tmp, seed=0)
            corpus_dir = tmp
        sets = builtin_sets(corpus_dir)
    for name, records in sets.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", records)
    return {name: len(records) for name, records in sets.items()}


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "src/minituner/course/probes"
    for stem, count in write_builtin_files(target).items():
        sys.stdout.write(f"{stem}: {count}\n")
