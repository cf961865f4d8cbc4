"""Harder held-out probe slices, built deterministically from the verb tables and the corpus's
own words. Each probe is scored like every other probe (:mod:`minituner.course.evaluate`).

- form choice (``form-choice-past``, ``form-choice-participle``): every line of the held-out
  test frames whose verb has two different irregular forms (``have``: had / had is left out),
  the correct form against the verb's *other* irregular form: "yesterday he ___ home" went vs
  gone, "he has already ___ home" gone vs went. Held out: the test frames never train, and the
  wrong candidate is a real form the adapter *did* learn, so "not -ed" alone does not pass.
- new sentence shapes (``new-shape-irregular``, ``new-shape-regular``): :data:`NEW_FRAMES`,
  frames the corpus never uses (a time phrase moved to the other end of the sentence, two time
  words or adverbs combined), filled with the corpus's subjects, verbs and complements; two
  person/complement pairs per verb and frame. Irregular verbs: correct vs over-regularised
  form; regular verbs: correct vs the wrong form of the control probes (walked vs walk). Held
  out: neither pretraining nor fine-tuning ever saw these shapes, so a regular-verb drop here
  is forgetting where the adapter was never trained.
- Spanish (``es-irregular-past``, ``es-irregular-participle``, ``es-form-choice``,
  ``es-new-shape-irregular``, ``es-new-shape-regular``): the Spanish side of the same lines.
  The wrong candidate of an irregular verb is its form by the regular -ar/-er/-ir rule (tuve vs
  tení, hecho vs hacido; lines where the rule gives the right form are left out); form choice
  is preterite vs participle (fue vs ido); a regular verb's wrong form is its present (past
  slot: trabajó vs trabaja) or infinitive (participle slot: trabajado vs trabajar).
- validation frames (``val-irregular-past``, ``val-irregular-participle``): the probes of the
  SFT *validation* frames, for choosing a method without looking at the test frames.

Every probe, filled with any candidate, fits the context with <bos> and <eos> (probes that
would not are dropped when a tokenizer is given; a test checks the committed files).
"""

from __future__ import annotations

import random

from minituner.course import verbs as V
from minituner.course.corpus import english_form, fill_frame, spanish_form
from minituner.course.data import BLANK, blank_pair, split_frames

# (english, spanish) templates per tense; none of them is a frame of corpus.FRAMES.
NEW_FRAMES = {
    "past": [
        ("{s} {v}{c} on monday", "{s} {v}{c} el lunes"),
        ("{s} {v}{c} in may", "{s} {v}{c} en mayo"),
        ("{s} {v}{c} last year", "{s} {v}{c} el año pasado"),
        ("then {s} {v}{c} last night", "luego {s} {v}{c} anoche"),
    ],
    "participle": [
        ("{s} {h} {v}{c} so far", "{s} {h} {v}{c} hasta hoy"),
        ("{s} {h} {v}{c} by now", "{s} {h} {v}{c} ya"),
        ("{s} {h} already {v}{c} today", "hoy {s} ya {h} {v}{c}"),
        ("{s} {h} never {v}{c} before", "{s} nunca {h} {v}{c} antes"),
    ],
}
PER_CELL = 2  # person/complement pairs per (verb, new frame)


def _ordered(correct: str, wrong: str, rng: random.Random) -> list:
    pair = [correct, wrong]
    rng.shuffle(pair)
    return pair


def _probe(prompt: str, correct: str, wrong: str, name: str, rng: random.Random,
           **labels) -> dict:
    return {"prompt": prompt, "candidates": _ordered(correct, wrong, rng), "answer": correct,
            "slice": name, **labels}


def other_irregular_form(verb: str, tense: str, person: str) -> str | None:
    """The verb's other irregular form for a past or participle slot (None when both agree)."""
    past, participle = V.ENGLISH[verb].past_for(person), V.ENGLISH[verb].participle
    if past == participle:
        return None
    return participle if tense == "past" else past


def wrong_regular_form(verb: str, tense: str, person: str) -> str:
    """A plausible wrong form of a regular verb for a tense and person."""
    ev = V.ENGLISH[verb]
    if tense in ("past", "participle"):
        return ev.base
    if tense == "present":
        return ev.base if person.startswith("3sg") else ev.third
    return ev.past


def regularised_spanish(verb: str, tense: str, person: str) -> str | None:
    """The Spanish form by the regular -ar/-er/-ir rule (None when it is the correct form)."""
    rule = V.regular_spanish(V.SPANISH[verb].infinitive)
    wrong = rule.participle if tense == "participle" else rule.preterite[V.spanish_slot(person)]
    return None if wrong == spanish_form(verb, tense, person) else wrong


def wrong_spanish_regular(verb: str, tense: str, person: str) -> str | None:
    """A wrong Spanish form of a regular verb's slot: its present (past) or infinitive; None
    when it is the correct form too (nosotros trabajamos: present and preterite agree)."""
    sv = V.SPANISH[verb]
    wrong = sv.infinitive if tense == "participle" else sv.present[V.spanish_slot(person)]
    return None if wrong == spanish_form(verb, tense, person) else wrong


def _fits(tokenizer, probe: dict) -> bool:
    """True when every candidate filled in fits the context with <bos> and <eos>."""
    if tokenizer is None:
        return True
    for candidate in probe["candidates"]:
        text = probe["prompt"].replace(BLANK, candidate)
        if not tokenizer.fits(text):
            return False
    return True


def _test_lines(irregular_records: list, frames) -> list:
    keep = set(frames)
    return [r for r in irregular_records if r["frame"] in keep]


def form_choice_probes(irregular_records: list, frames=None, seed: int = 0,
                       tokenizer=None) -> list:
    """English form-choice probes of the ``frames`` (default: the test frames)."""
    rng = random.Random(f"{seed}:form-choice")
    probes = []
    for record in _test_lines(irregular_records, frames or split_frames()["test"]):
        other = other_irregular_form(record["verb"], record["tense"], record["person"])
        if other is None:
            continue
        pair = blank_pair(record)["en"]
        probe = _probe(pair["prompt"], pair["completion"], other,
                       f"form-choice-{record['tense']}", rng, verb=record["verb"],
                       person=record["person"], frame=record["frame"])
        if _fits(tokenizer, probe):
            probes.append(probe)
    return probes


def spanish_test_probes(irregular_records: list, frames=None, seed: int = 0,
                        tokenizer=None) -> list:
    """Spanish probes of the ``frames`` (default: the test frames): regular-rule forms and
    preterite vs participle."""
    rng = random.Random(f"{seed}:spanish")
    probes = []
    for record in _test_lines(irregular_records, frames or split_frames()["test"]):
        verb, tense, person = record["verb"], record["tense"], record["person"]
        pair = blank_pair(record)["es"]
        labels = {"verb": verb, "person": person, "frame": record["frame"]}
        wrong = regularised_spanish(verb, tense, person)
        other = (V.SPANISH[verb].participle if tense == "past"
                 else V.SPANISH[verb].preterite[V.spanish_slot(person)])
        made = [_probe(pair["prompt"], pair["completion"], other, "es-form-choice", rng,
                       **labels)]
        if wrong is not None:
            made.append(_probe(pair["prompt"], pair["completion"], wrong,
                               f"es-irregular-{tense}", rng, **labels))
        probes += [p for p in made if _fits(tokenizer, p)]
    return probes


def new_shape_probes(seed: int = 0, tokenizer=None) -> list:
    """English and Spanish probes of :data:`NEW_FRAMES` for every verb, irregular and regular."""
    probes = []
    for verb in V.IRREGULAR_VERBS + V.REGULAR_VERBS:
        kind = "irregular" if V.is_irregular(verb) else "regular"
        for tense, frames in NEW_FRAMES.items():
            for index, templates in enumerate(frames):
                rng = random.Random(f"{seed}:new-shape:{verb}:{tense}:{index}")
                combos = [(p, c) for p in V.PERSONS
                          for c in range(len(V.ENGLISH[verb].complements))]
                rng.shuffle(combos)
                taken = 0
                for person, complement in combos:
                    if taken == PER_CELL:
                        break
                    made = _new_shape_pair(templates, verb, tense, person, complement, kind,
                                           f"new:{tense}:{index}", rng)
                    if made and all(_fits(tokenizer, p) for p in made):
                        probes += made
                        taken += 1
    return probes


def _new_shape_pair(templates, verb, tense, person, complement, kind, frame, rng) -> list:
    """The English and (when it has a wrong form) Spanish probe of one new-shape line."""
    en_prompt, es_prompt = fill_frame(templates, verb, tense, person, complement, BLANK, BLANK)
    if kind == "irregular":
        en_wrong = V.overregularised_past(verb)
        es_wrong = regularised_spanish(verb, tense, person)
    else:
        en_wrong = wrong_regular_form(verb, tense, person)
        es_wrong = wrong_spanish_regular(verb, tense, person)
    labels = {"verb": verb, "tense": tense, "person": person, "frame": frame}
    made = [_probe(en_prompt, english_form(verb, tense, person), en_wrong,
                   f"new-shape-{kind}", rng, **labels)]
    if es_wrong is not None:
        made.append(_probe(es_prompt, spanish_form(verb, tense, person), es_wrong,
                           f"es-new-shape-{kind}", rng, **labels))
    return made
