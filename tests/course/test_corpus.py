
from minituner.course import corpus
from minituner.course import verbs as V
from minituner.course.pretraining import build_corpus
from minituner.util.jsonl import read_jsonl

IRREGULAR_PAST_FORMS = {"went", "gone", "ate", "eaten", "wrote", "written", "saw", "seen",
                        "came", "did", "done", "had", "was", "were", "been"}


def test_every_verb_tense_and_person_is_covered():
    sentences = corpus.all_sentences()
    seen = {(s.verb, s.tense, s.person) for s in sentences}
    for verb in V.IRREGULAR_VERBS + V.REGULAR_VERBS:
        for tense in corpus.TENSES:
            for person in V.PERSONS:
                assert (verb, tense, person) in seen
    assert len(V.IRREGULAR_VERBS) == 8 and len(V.REGULAR_VERBS) == 12


def test_every_line_has_a_spanish_pair():
    for s in corpus.all_sentences():
        assert s.en and s.es and s.en != s.es


def test_known_forms():
    s = corpus.render("go", "past", "3sg_m", 0, 0)
    assert (s.en, s.es) == ("yesterday he went home", "ayer él fue a casa")
    s = corpus.render("study", "present", "3sg_f", 0, 0)
    assert s.en == "every day she studies math"
    assert corpus.render("eat", "participle", "1pl", 0, 0).en == "we have already eaten bread"
    assert V.overregularised_past("go") == "goed"
    assert V.overregularised_past("eat") == "eated"
    assert V.overregularised_past("write") == "writed"


def test_pretraining_text_has_no_irregular_past_forms():
    for s in corpus.all_sentences():
        if corpus.is_pretraining_sentence(s) and V.is_irregular(s.verb):
            assert s.tense not in corpus.HELD_OUT_TENSES


def test_written_splits_exclude_irregular_pasts_and_misconjugations(tmp_path):
    manifest, _ = build_corpus(tmp_path, seed=0)
    words = set()
    for split in ("train", "validation", "test"):
        for r in read_jsonl(tmp_path / f"{split}.jsonl"):
            words.update(r["en"].split())
    # "had" and "was"/"were" are also past forms of have/be: none may appear.
    assert not (words & IRREGULAR_PAST_FORMS)
    assert not (words & {"goed", "eated", "writed"})
    wrong = read_jsonl(tmp_path / "misconjugations.jsonl")
    assert {r["kind"] for r in wrong} >= {"overregularised-past", "missing-third-person-s"}
    assert any(r["en_wrong"] == "yesterday he goed home" for r in wrong)
    assert manifest["counts"]["train"] > 0 and "irregular past" in manifest["note"]


def test_every_sequence_fits_the_context(tmp_path):
    _, tokenizer = build_corpus(tmp_path, seed=0)
    for split in ("train", "validation", "test"):
        for r in read_jsonl(tmp_path / f"{split}.jsonl"):
            assert len(tokenizer.encode(r["en"], bos=True, eos=True)) <= 32
            assert len(tokenizer.encode(r["es"], bos=True, eos=True)) <= 32


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path):
    a = build_corpus(tmp_path / "a", seed=1)[0]["files"]
    b = build_corpus(tmp_path / "b", seed=1)[0]["files"]
    c = build_corpus(tmp_path / "c", seed=2)[0]["files"]
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    a_bytes = (tmp_path / "a" / "train.jsonl").read_bytes()
    assert a_bytes == (tmp_path / "b" / "train.jsonl").read_bytes()
