"""The bilingual verb corpus: deterministic English/Spanish sentences, split and hashed.

Every sentence is a short frame (a time word, a subject, a verb form, a complement) with its
Spanish pair. The pretraining text deliberately leaves out the irregular past simple and past
participle forms ("went", "eaten"): a learner meets the -ed rule long before the exceptions,
so the base model over-regularises and LoRA has something real to fix. Those forms are kept in
``irregular.jsonl`` for fine-tuning, and labelled mis-conjugations ("goed", "he work") go to
``misconjugations.jsonl`` for the evaluation; neither enters the pretraining text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from minituner.course import verbs as V
from minituner.util.files import atomic_write_json, sha256_file
from minituner.util.jsonl import write_jsonl

CORPUS_FORMAT_VERSION = 1

# (english, spanish) frame templates per tense; {s} subject, {v} verb form, {c} complement.
# Spanish perfect frames use {h} for the form of "haber"; {p} is the form of "poder".
FRAMES = {
    "infinitive": [
        ("{s} can {v}{c}", "{s} {p} {v}{c}"),
        ("today {s} can {v}{c}", "hoy {s} {p} {v}{c}"),
    ],
    "present": [
        ("every day {s} {v}{c}", "cada día {s} {v}{c}"),
        ("{s} {v}{c} every day", "{s} {v}{c} cada día"),
        ("{s} often {v}{c}", "{s} a menudo {v}{c}"),
        ("now {s} {v}{c}", "ahora {s} {v}{c}"),
    ],
    "past": [
        ("yesterday {s} {v}{c}", "ayer {s} {v}{c}"),
        ("{s} {v}{c} yesterday", "{s} {v}{c} ayer"),
        ("last night {s} {v}{c}", "anoche {s} {v}{c}"),
        ("{s} {v}{c} last night", "{s} {v}{c} anoche"),
        ("this morning {s} {v}{c}", "esta mañana {s} {v}{c}"),
        ("last year {s} {v}{c}", "el año pasado {s} {v}{c}"),
        ("then {s} {v}{c}", "luego {s} {v}{c}"),
        ("once {s} {v}{c}", "una vez {s} {v}{c}"),
        ("on monday {s} {v}{c}", "el lunes {s} {v}{c}"),
        ("in may {s} {v}{c}", "en mayo {s} {v}{c}"),
    ],
    "participle": [
        ("{s} {h} already {v}{c}", "{s} ya {h} {v}{c}"),
        ("{s} {h} never {v}{c}", "{s} nunca {h} {v}{c}"),
        ("{s} {h} just {v}{c}", "{s} {h} {v}{c} ahora"),
        ("{s} {h} {v}{c} today", "hoy {s} {h} {v}{c}"),
        ("{s} {h} {v}{c} before", "{s} {h} {v}{c} antes"),
        ("{s} {h} {v}{c} twice", "{s} {h} {v}{c} dos veces"),
        ("by now {s} {h} {v}{c}", "ya {s} {h} {v}{c}"),
        ("{s} {h} often {v}{c}", "{s} {h} {v}{c} a menudo"),
        ("so far {s} {h} {v}{c}", "hasta hoy {s} {h} {v}{c}"),
        ("{s} {h} {v}{c} this week", "{s} {h} {v}{c} esta semana"),
    ],
    "future": [
        ("tomorrow {s} will {v}{c}", "mañana {s} {v}{c}"),
        ("{s} will {v}{c} soon", "{s} {v}{c} pronto"),
        ("next week {s} will {v}{c}", "la otra semana {s} {v}{c}"),
    ],
}
TENSES = tuple(FRAMES)
HELD_OUT_TENSES = ("past", "participle")  # irregular forms of these never enter pretraining


@dataclass(frozen=True)
class Sentence:
    """One bilingual corpus line with its labels."""

    en: str
    es: str
    verb: str
    tense: str
    person: str
    frame: str  # "<tense>:<index>", the key the fine-tuning split groups by
    complement: int

    @property
    def verb_class(self) -> str:
        """'irregular' or 'regular'."""
        return "irregular" if V.is_irregular(self.verb) else "regular"

    def to_record(self) -> dict:
        """JSON-ready dict."""
        return {
            "en": self.en, "es": self.es, "verb": self.verb, "verb_class": self.verb_class,
            "tense": self.tense, "person": self.person, "frame": self.frame,
            "complement": self.complement,
        }


def english_form(verb: str, tense: str, person: str) -> str:
    """The English verb form a frame slot takes."""
    ev = V.ENGLISH[verb]
    if tense in ("infinitive", "future"):
        return ev.base
    if tense == "present":
        return ev.present(person)
    if tense == "past":
        return ev.past_for(person)
    return ev.participle


def spanish_form(verb: str, tense: str, person: str) -> str:
    """The Spanish verb form a frame slot takes."""
    sv, slot = V.SPANISH[verb], V.spanish_slot(person)
    return {
        "infinitive": sv.infinitive,
        "present": sv.present[slot],
        "past": sv.preterite[slot],
        "participle": sv.participle,
        "future": sv.future[slot],
    }[tense]


def render(verb: str, tense: str, person: str, frame_index: int, complement: int,
           en_form: str | None = None, es_form: str | None = None) -> Sentence:
    """Fill one frame; ``en_form`` / ``es_form`` override the verb forms (mis-conjugations,
    fill-in-the-blank frames)."""
    en, es = fill_frame(FRAMES[tense][frame_index], verb, tense, person, complement,
                        en_form, es_form)
    return Sentence(en, es, verb, tense, person, f"{tense}:{frame_index}", complement)


def fill_frame(templates: tuple, verb: str, tense: str, person: str, complement: int,
               en_form: str | None = None, es_form: str | None = None) -> tuple:
    """(english, spanish) of an (english, spanish) frame template filled for one verb, person
    and complement (``en_form`` / ``es_form`` override the verb forms)."""
    en_t, es_t = templates
    c_en, c_es = V.ENGLISH[verb].complements[complement]
    person_is_3sg = person.startswith("3sg")
    en = en_t.format(
        s=V.SUBJECTS_EN[person],
        v=en_form or english_form(verb, tense, person),
        c=" " + c_en,
        h="has" if person_is_3sg else "have",
    )
    slot = V.spanish_slot(person)
    es = es_t.format(
        s=V.SUBJECTS_ES[person], v=es_form or spanish_form(verb, tense, person), c=" " + c_es,
        h=V.HABER[slot], p=V.PODER[slot],
    )
    return en, es


def all_sentences() -> list:
    """Every correct sentence: verbs x tenses x persons x frames x complements, fixed order."""
    out = []
    for verb in V.IRREGULAR_VERBS + V.REGULAR_VERBS:
        for tense in TENSES:
            for person in V.PERSONS:
                for frame_index in range(len(FRAMES[tense])):
                    for complement in range(len(V.ENGLISH[verb].complements)):
                        out.append(render(verb, tense, person, frame_index, complement))
    return out


def is_pretraining_sentence(sentence: Sentence) -> bool:
    """False for irregular past/participle lines, which pretraining never sees."""
    return not (V.is_irregular(sentence.verb) and sentence.tense in HELD_OUT_TENSES)


def misconjugations() -> list:
    """Labelled wrong sentences: over-regularised pasts and a missing third-person -s."""
    records = []
    for s in all_sentences():
        if V.is_irregular(s.verb) and s.tense in HELD_OUT_TENSES and s.verb != "be":
            wrong_form = V.overregularised_past(s.verb)
            kind = "overregularised-" + s.tense
        elif s.tense == "present" and s.person.startswith("3sg") and s.verb != "be":
            wrong_form = V.ENGLISH[s.verb].base
            kind = "missing-third-person-s"
        else:
            continue
        wrong = render(s.verb, s.tense, s.person, int(s.frame.split(":")[1]), s.complement,
                       en_form=wrong_form)
        records.append({**s.to_record(), "en_wrong": wrong.en, "kind": kind})
    return records


def split_records(records: list, seed: int, fractions=(0.9, 0.05, 0.05)) -> dict:
    """Shuffle with ``seed`` and cut into train / validation / test."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * fractions[0])
    n_val = int(len(shuffled) * fractions[1])
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def pretraining_texts(records: list) -> list:
    """The English and the Spanish line of each record, as separate training texts."""
    return [text for r in records for text in (r["en"], r["es"])]


def write_corpus(out_dir: str | Path, seed: int = 0, tokenizer=None) -> dict:
    """Write the corpus splits, the held-out irregular lines, the mis-conjugations and a manifest.

    With a tokenizer, lines whose English or Spanish side would not fit the context are dropped
    and counted in the manifest.
    """
    out = Path(out_dir)
    sentences = all_sentences()
    pre = [s.to_record() for s in sentences if is_pretraining_sentence(s)]
    held = [s.to_record() for s in sentences if not is_pretraining_sentence(s)]
    dropped = 0
    if tokenizer is not None:
        fits = [r for r in pre if tokenizer.fits(r["en"]) and tokenizer.fits(r["es"])]
        dropped, pre = len(pre) - len(fits), fits
    files = {name: recs for name, recs in split_records(pre, seed).items()}
    files["irregular"] = held
    files["misconjugations"] = misconjugations()
    manifest = {
        "format_version": CORPUS_FORMAT_VERSION,
        "seed": seed,
        "counts": {name: len(recs) for name, recs in files.items()},
        "dropped_too_long": dropped,
        "verbs": {"irregular": list(V.IRREGULAR_VERBS), "regular": list(V.REGULAR_VERBS)},
        "note": (
            "The pretraining splits (train/validation/test) contain no irregular past simple or "
            "past participle form; those lines are in irregular.jsonl for fine-tuning. "
            "misconjugations.jsonl holds labelled wrong forms for evaluation only."
        ),
        "files": {},
    }
    for name, recs in files.items():
        path = write_jsonl(out / f"{name}.jsonl", recs)
        manifest["files"][f"{name}.jsonl"] = sha256_file(path)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
