"""The harder probe slices, the frame folds and the seed intervals."""

from __future__ import annotations

import math

import pytest

from minituner.course import corpus
from minituner.course import verbs as V
from minituner.course.data import BLANK, build_sft_set, fold_frames, split_frames
from minituner.course.evaluate import builtin_path, load_probes
from minituner.course.slices import NEW_FRAMES
from minituner.course.stats import summarise, t_critical
from minituner.course.sweep import elbow_rank
from minituner.models.tokenizer import Tokenizer
from minituner.util.jsonl import read_jsonl


def _filled(probe: dict, candidate: str) -> str:
    return probe["prompt"].replace(BLANK, candidate)


def test_form_choice_pairs_are_the_verbs_two_forms_on_test_frames():
    probes = load_probes(builtin_path("form_choice"))
    test_frames = set(split_frames()["test"])
    assert {p["frame"] for p in probes} <= test_frames
    for probe in probes:
        ev = V.ENGLISH[probe["verb"]]
        past, participle = ev.past_for(probe["person"]), ev.participle
        assert past != participle and set(probe["candidates"]) == {past, participle}
        tense = probe["slice"].removeprefix("form-choice-")
        assert probe["answer"] == (past if tense == "past" else participle)
    verbs = {p["verb"] for p in probes}
    assert "have" not in verbs  # had / had: nothing to choose
    assert verbs == set(V.IRREGULAR_VERBS) - {"have"}
    assert {p["slice"] for p in probes} == {"form-choice-past", "form-choice-participle"}


def test_new_shapes_are_frames_the_corpus_never_uses():
    corpus_templates = {t for frames in corpus.FRAMES.values() for pair in frames for t in pair}
    for frames in NEW_FRAMES.values():
        for en, es in frames:
            assert en not in corpus_templates and es not in corpus_templates
    corpus_lines = {line for s in corpus.all_sentences() for line in (s.en, s.es)}
    probes = load_probes(builtin_path("new_shapes"))
    for probe in probes:
        assert _filled(probe, probe["answer"]) not in corpus_lines
    verbs = {p["verb"] for p in probes}
    assert set(V.IRREGULAR_VERBS) <= verbs and set(V.REGULAR_VERBS) <= verbs
    assert {p["slice"] for p in probes} == {"new-shape-irregular", "new-shape-regular",
                                            "es-new-shape-irregular", "es-new-shape-regular"}


def test_every_new_probe_fits_the_context_with_bos_and_eos(tiny_base_run):
    tokenizer = Tokenizer.load(tiny_base_run / "tokenizer.json")
    for name in ("form_choice", "new_shapes", "spanish", "validation_frames"):
        for probe in read_jsonl(builtin_path(name)):
            for candidate in probe["candidates"]:
                ids = tokenizer.encode(_filled(probe, candidate), bos=True, eos=True)
                assert len(ids) <= 32, (name, probe["prompt"], candidate)
                assert tokenizer.unk_id not in ids


def test_spanish_probes_wrong_form_differs_and_form_choice_is_preterite_vs_participle():
    probes = load_probes(builtin_path("spanish"))
    assert {p["frame"] for p in probes} <= set(split_frames()["test"])
    for probe in probes:
        assert probe["answer"] in probe["candidates"] and len(set(probe["candidates"])) == 2
        if probe["slice"] == "es-form-choice":
            sv = V.SPANISH[probe["verb"]]
            preterite = sv.preterite[V.spanish_slot(probe["person"])]
            assert set(probe["candidates"]) == {preterite, sv.participle}
    assert {"es-irregular-past", "es-irregular-participle", "es-form-choice"} == {
        p["slice"] for p in probes}


def test_validation_probes_come_from_the_validation_frames():
    probes = load_probes(builtin_path("validation_frames"))
    assert {p["frame"] for p in probes} == set(split_frames()["validation"])


def test_each_frame_is_held_out_once_across_the_folds(tiny_base_run):
    tested = []
    for fold in range(10):
        frames = fold_frames(fold)
        assert len(frames["train"]) == 16 and len(frames["test"]) == 2
        assert not set(frames["validation"]) & set(frames["test"])
        tested += frames["test"]
    assert sorted(tested) == sorted(f"{t}:{i}" for t in ("past", "participle") for i in range(10))
    tokenizer = Tokenizer.load(tiny_base_run / "tokenizer.json")
    records = read_jsonl(tiny_base_run / "corpus" / "irregular.jsonl")
    sft = build_sft_set(records, tokenizer, frames=fold_frames(3))
    assert {e["frame"] for e in sft["test"]} == {"past:3", "participle:3"}
    assert not {e["frame"] for e in sft["train"]} & {"past:3", "participle:3", "past:4",
                                                     "participle:4"}
    with pytest.raises(ValueError, match="fold"):
        fold_frames(10)


def test_t_interval_matches_a_hand_computed_one():
    # mean 0.85; squared deviations .0025 + 0 + .0025 + .0009 + .0009 = .0068; s = sqrt(.0017)
    stats = summarise([0.80, 0.85, 0.90, 0.82, 0.88])
    s = math.sqrt(0.0017)
    half = 2.776 * s / math.sqrt(5)
    assert stats["mean"] == pytest.approx(0.85) and stats["std"] == pytest.approx(s)
    assert stats["ci95"] == pytest.approx([0.85 - half, 0.85 + half])
    assert stats["ci95"] == pytest.approx([0.79881, 0.90119], abs=1e-5)
    assert t_critical(2) == 4.303 and t_critical(100) == 1.960
    assert summarise([0.5])["ci95"] is None
    with pytest.raises(ValueError):
        summarise([])


def test_elbow_with_intervals_takes_the_smallest_rank_the_seeds_cannot_separate():
    ranks, means = [0, 2, 4, 8], [0.1, 0.70, 0.80, 0.85]
    assert elbow_rank(ranks, means) == 8
    assert elbow_rank(ranks, means, upper=[0.1, 0.75, 0.86, 0.90]) == 4
