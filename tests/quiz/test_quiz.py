"""The quiz: schema validation, the committed content, the Markdown mirror and `quiz take`."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minituner.cli import main as cli_main
from minituner.quiz import (
    QuizError,
    checkout_root,
    default_quiz_path,
    default_results_path,
    load_quiz,
    parse_quiz,
)
from minituner.quiz import locations as quiz_locations
from minituner.quiz.page import page_name, render_page, render_pages, stale_pages, write_pages
from minituner.quiz.take import load_answers, order_questions, parse_choice, take_quiz

ROOT = Path(__file__).resolve().parents[2]
QUIZ_PATH = default_quiz_path(ROOT)
PAGES_DIR = ROOT / "docs" / "quizzes"


@pytest.fixture(scope="module")
def quiz():
    return load_quiz(QUIZ_PATH)


def _minimal() -> dict:
    text = {"en": "x", "es": "x"}
    return {
        "quiz": {"id": "phase-28-lora-qlora", "title": dict(text)},
        "questions": [
            {
                "id": "q-28-01", "kind": "single", "title": dict(text), "prompt": dict(text),
                "explanation": dict(text), "options": [dict(text) for _ in range(4)],
                "answer": [4], "tags": ["lora"], "check": "lora_params_per_rank",
            },
            {
                "id": "q-28-02", "kind": "free", "title": dict(text), "prompt": dict(text),
                "explanation": dict(text), "answer": dict(text), "tags": ["lora"],
                "check": "lora_ratio_by_width",
                "expected": {"ratio_h64": {"value": 0.25, "tolerance": 0.0}},
            },
            {
                "id": "q-28-03", "kind": "multi", "title": dict(text), "prompt": dict(text),
                "explanation": dict(text), "options": [dict(text) for _ in range(4)],
                "answer": [1, 3, 4], "tags": ["lora"],
            },
        ],
    }


# ----------------------------------------------------------------------------- schema


def test_minimal_quiz_is_valid():
    quiz = parse_quiz(_minimal())
    assert [q.id for q in quiz.questions] == ["q-28-01", "q-28-02", "q-28-03"]
    assert quiz.questions[2].answer_set == {1, 3, 4}


def _drop_es_of_option_2(d):
    del d["questions"][2]["options"][1]["es"]


def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _duplicate_first(d):
    d["questions"].append(copy.deepcopy(d["questions"][0]))


SCHEMA_ERRORS = [
    (_drop_es_of_option_2, "q-28-03.options[2]: missing translation 'es'"),
    (_set(["questions", 0, "title", "en"], "  "), "q-28-01.title: empty translation 'en'"),
    (_set(["questions", 0, "prompt", "fr"], "x"), "q-28-01.prompt: unknown language 'fr'"),
    (_set(["questions", 0, "answer"], [5]), "q-28-01.answer: option 5 out of range 1..4"),
    (_set(["questions", 2, "answer"], [0]), "q-28-03.answer: option 0 out of range 1..4"),
    (_set(["questions", 0, "answer"], [1, 2]), "q-28-01.answer: a single question needs exactly 1"),
    (_set(["questions", 0, "answer"], 4), "q-28-01.answer: must be a non-empty list"),
    (_set(["questions", 2, "answer"], [1, 1]), "q-28-03.answer: repeated option number"),
    (_set(["questions", 2, "answer"], ["1"]), "q-28-03.answer: option numbers must be integers"),
    (_duplicate_first, "q-28-01.id: duplicate id"),
    (_set(["questions", 0, "kind"], "essay"), "q-28-01.kind: unknown kind 'essay'"),
    (_set(["questions", 0, "check"], "nope"), "q-28-01.check: unknown check 'nope'"),
    (_set(["questions", 1, "id"], "q28-2"), "questions[1].id: bad id format 'q28-2'"),
    (_set(["questions", 1, "id"], "q-29-02"), "q-29-02.id: phase 29 does not match quiz phase 28"),
    (_delete(["questions", 0, "explanation"]), "q-28-01.explanation: missing field"),
    (_set(["questions", 0, "optoins"], []), "q-28-01: unknown field 'optoins'"),
    (_set(["questions", 1, "options"], [{"en": "a", "es": "a"}] * 2),
     "q-28-02.options: a free question takes no options"),
    (_set(["questions", 0, "options"], [{"en": "a", "es": "a"}]),
     "q-28-01.options: a single question needs a list of at least 2 options"),
    (_set(["questions", 0, "tags"], []), "q-28-01.tags: must be a non-empty list"),
    (_delete(["questions", 1, "expected"]), "q-28-02.expected: a free question with a check needs"),
    (_set(["questions", 0, "expected"], {"a": 1}), "q-28-01.expected: a single question's check"),
    (_set(["questions", 1, "expected", "ratio_h64"], {"value": 0.25, "tolerance": -1}),
     "q-28-02.expected.ratio_h64.tolerance: must be a number >= 0"),
    (_set(["questions", 1, "expected", "ratio_h64"], {"value": "a", "tolerance": 0.1}),
     "q-28-02.expected.ratio_h64.value: must be a number"),
    (_set(["questions", 2, "expected"], {"a": 1}),
     "q-28-03.expected: expected values need a check"),
    (_set(["questions", 1, "answer"], "just text"),
     "q-28-02.answer: must be a mapping of language"),
    (_set(["quiz", "id"], "quiz 28"), "quiz.id: must look like"),
    (_delete(["quiz", "title", "es"]), "quiz.title: missing translation 'es'"),
    (_set(["questions"], []), "questions: must be a non-empty list"),
    (_set(["extra"], 1), "top level: unknown field 'extra'"),
]


@pytest.mark.parametrize(("mutate", "message"), SCHEMA_ERRORS, ids=[m for _, m in SCHEMA_ERRORS])
def test_schema_errors_name_question_and_field(mutate, message):
    data = _minimal()
    mutate(data)
    with pytest.raises(QuizError) as info:
        parse_quiz(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_errors_name_the_file(tmp_path):
    data = _minimal()
    _drop_es_of_option_2(data)
    path = tmp_path / "quiz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(QuizError, match=r"quiz\.yaml: q-28-03\.options\[2\]: missing translation"):
        load_quiz(path)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "quiz.yaml"
    path.write_text("quiz: {id: phase-28-x, id: phase-28-y}\nquestions: []\n", encoding="utf-8")
    with pytest.raises(QuizError, match="duplicate key 'id'"):
        load_quiz(path)


def test_broken_yaml_and_missing_file(tmp_path):
    path = tmp_path / "quiz.yaml"
    path.write_text("quiz: [unclosed\n", encoding="utf-8")
    with pytest.raises(QuizError, match="not valid YAML"):
        load_quiz(path)
    with pytest.raises(FileNotFoundError, match="quiz file not found"):
        load_quiz(tmp_path / "missing.yaml")


def _cli(*args, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "minituner", "quiz", *args], input=stdin, capture_output=True,
        text=True, encoding="utf-8", env=env, cwd=cwd, timeout=120,
    )


def test_cli_validation_error_is_one_line_exit_1(tmp_path):
    data = _minimal()
    data["questions"][0]["answer"] = [9]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = _cli("validate", "--quiz", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "q-28-01.answer: option 9 out of range 1..4" in lines[0]


# ----------------------------------------------------------------------------- content


def test_committed_quiz_has_the_seed_questions(quiz):
    ids = [q.id for q in quiz.questions]
    assert ids == [f"q-28-{n:02d}" for n in range(1, len(ids) + 1)]
    assert len(ids) >= 12
    kinds = [q.kind for q in quiz.questions[:5]]
    assert kinds == ["single", "single", "multi", "free", "free"]
    assert [q.answer for q in quiz.questions[:3]] == [(4,), (2,), (1, 3, 4)]
    q01 = [o.en for o in quiz.question("q-28-01").options]
    assert q01 == ["128 r", "640 r", "1024 r", "2304 r"]
    q02 = [o.en.lower() for o in quiz.question("q-28-02").options]
    assert "unstable" in q02[0] and "pretrained" in q02[1]
    assert "rank" in q02[2] and "adamw" in q02[3]
    q03 = [o.en.lower() for o in quiz.question("q-28-03").options]
    assert "zero trainable" in q03[0] and "frozen" in q03[1]
    assert "zero matrix" in q03[2] and "empty parameter list" in q03[3]
    assert "NF4" in quiz.question("q-28-05").answer.en


def test_every_numeric_question_has_a_check(quiz):
    for question in quiz.questions:
        text = question.prompt.en + " ".join(o.en for o in question.options)
        if re.search(r"\d", text):
            assert question.check, f"{question.id} states numbers but has no check"


def test_spanish_is_a_translation_not_a_copy(quiz):
    for question in quiz.questions:
        assert question.prompt.es != question.prompt.en
        assert question.explanation.es != question.explanation.en
    spanish = " ".join(q.explanation.es for q in quiz.questions)
    assert re.search(r"[áéíóúñ¿]", spanish)


# ----------------------------------------------------------------------------- render


def test_render_is_deterministic_and_committed_pages_are_current(quiz):
    assert render_pages(quiz) == render_pages(load_quiz(QUIZ_PATH))
    assert stale_pages(quiz, PAGES_DIR) == [], "run `minituner quiz render`"
    for name, text in render_pages(quiz).items():
        assert (PAGES_DIR / name).read_text(encoding="utf-8") == text


def test_pages_link_each_other_and_hide_answers(quiz):
    english, spanish = render_page(quiz, "en"), render_page(quiz, "es")
    assert f"]({page_name(quiz, 'es')})" in english
    assert f"]({page_name(quiz, 'en')})" in spanish
    assert "data/quizzes/phase-28-lora-qlora.yaml" in english
    assert english.count("<details><summary>Answer</summary>") == len(quiz.questions)
    assert spanish.count("<details><summary>Respuesta</summary>") == len(quiz.questions)
    for question in quiz.questions:
        section = english.split(f"## {question.id}: ")[1].split("\n## ")[0]
        visible, hidden = section.split("<details>")
        assert question.explanation.en not in visible
        assert question.explanation.en in hidden
        for number, option in enumerate(question.options, 1):
            assert f"{number}. {option.en}" in visible


def test_write_and_stale_detection(quiz, tmp_path):
    assert sorted(stale_pages(quiz, tmp_path)) == sorted(render_pages(quiz))
    write_pages(quiz, tmp_path)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_pages(quiz, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert stale_pages(quiz, tmp_path) == []
    page = tmp_path / page_name(quiz, "es")
    page.write_text(page.read_text(encoding="utf-8") + "edit\n", encoding="utf-8")
    assert stale_pages(quiz, tmp_path) == [page.name]


def test_cli_render_check(tmp_path):
    assert _cli("render", "--out-dir", str(tmp_path), "--check").returncode == 1
    assert _cli("render", "--out-dir", str(tmp_path)).returncode == 0
    assert _cli("render", "--out-dir", str(tmp_path), "--check").returncode == 0


def test_cli_render_defaults_to_the_checkout_pages():
    result = _cli("render", "--check", cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr
    assert str(PAGES_DIR) in result.stdout


def test_cli_render_outside_a_checkout_needs_out_dir(monkeypatch, capsys):
    monkeypatch.setattr(quiz_locations, "checkout_root", lambda: None)
    assert cli_main(["quiz", "render"]) == 1
    assert capsys.readouterr().err.strip() == (
        "minituner quiz: error: --out-dir: not in a minituner checkout; "
        "name where to write the pages"
    )


# ----------------------------------------------------------------------------- locations


def test_the_checkout_is_found_from_the_package():
    assert checkout_root() == ROOT
    assert QUIZ_PATH == ROOT / "data" / "quizzes" / "phase-28-lora-qlora.yaml"


@pytest.mark.parametrize(
    ("packaged", "documented"),
    [
        (default_quiz_path(), "data/quizzes/phase-28-lora-qlora.yaml"),
        (default_results_path(), "docs/results/phase-28.json"),
    ],
)
def test_package_data_is_a_link_to_the_documented_file(packaged, documented):
    """The package's quiz and results files are symlinks to the checkout's files, so the two
    cannot drift; the documented paths hold the real bytes."""
    assert packaged.parent == ROOT / "src" / "minituner" / "quiz" / "data"
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / documented).resolve()
    assert not (ROOT / documented).is_symlink()
    assert packaged.read_bytes() == (ROOT / documented).read_bytes()


def test_default_quiz_is_the_package_copy():
    assert load_quiz() == load_quiz(QUIZ_PATH)


# ----------------------------------------------------------------------------- take


def _right(question) -> str:
    return "y" if question.kind == "free" else ",".join(map(str, question.answer))


def _wrong(question) -> str:
    if question.kind == "free":
        return "n"
    others = [n for n in range(1, len(question.options) + 1) if n not in question.answer]
    return str(others[0])


def _lines(questions, wrong_ids=()) -> str:
    out = []
    for question in questions:
        if question.kind == "free":
            out.append("my own answer")
        out.append(_wrong(question) if question.id in wrong_ids else _right(question))
    return "\n".join(out) + "\n"


def test_take_all_correct_scores_full(quiz, capsys):
    stdout = io.StringIO()
    result = take_quiz(quiz, io.StringIO(_lines(quiz.questions)), stdout)
    count = len(quiz.questions)
    assert (result.correct, result.answered, result.stopped) == (count, count, False)
    assert stdout.getvalue().rstrip().endswith(f"Score: {count}/{count}")
    assert capsys.readouterr().out == ""  # the library writes only to the given stream


def test_take_some_wrong_scores_partially(quiz):
    wrong = {"q-28-02", "q-28-03", "q-28-04"}
    stdout = io.StringIO()
    result = take_quiz(quiz, io.StringIO(_lines(quiz.questions, wrong)), stdout)
    assert result.correct == len(quiz.questions) - 3
    assert {qid for qid, ok in result.graded if not ok} == wrong
    assert "Not quite. The answer is 1, 3, 4." in stdout.getvalue()


def test_take_reasks_on_bad_input_and_stops_at_eof(quiz):
    questions = quiz.select(["q-28-01", "q-28-03", "q-28-02"])
    stdout = io.StringIO()
    text = "seven\n9\n1,2\n4\n1, 3 4\n"  # three bad tries, q-28-01 right, q-28-03 right, EOF
    result = take_quiz(quiz, io.StringIO(text), stdout, ids=[q.id for q in questions])
    assert result.stopped and result.answered == 2 and result.correct == 2
    out = stdout.getvalue()
    assert "'seven' is not an option number" in out and "option 9 out of range 1..4" in out
    assert "choose exactly one option" in out
    assert out.rstrip().endswith("Stopped after 2 of 3 questions.\nScore: 2/2")


def test_take_ctrl_c_ends_with_score_so_far(quiz):
    class Interrupting(io.StringIO):
        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    stdout = io.StringIO()
    result = take_quiz(quiz, Interrupting("4\n1\n"), stdout, ids=["q-28-01", "q-28-02", "q-28-03"])
    assert result.stopped and (result.correct, result.answered) == (1, 2)
    assert stdout.getvalue().rstrip().endswith("Score: 1/2")


def test_take_spanish_and_scripted_answers(quiz, tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"q-28-01": 4, "q-28-03": "1,3", "q-28-04": "sí"}), "utf-8")
    answers = load_answers(path, quiz)
    stdout = io.StringIO()
    result = take_quiz(quiz, io.StringIO(""), stdout, lang="es",
                       ids=["q-28-01", "q-28-03", "q-28-04"], answers=answers)
    assert (result.correct, result.answered, result.stopped) == (2, 3, False)
    assert "Puntuación: 2/3" in stdout.getvalue()
    assert quiz.question("q-28-03").explanation.es in stdout.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"q-28-99": 1}, "q-28-99: no such question"),
        ({"q-28-01": 7}, "q-28-01: option 7 out of range"),
        ({"q-28-01": [1, 2]}, "q-28-01: choose exactly one option"),
        ({"q-28-04": "maybe"}, "q-28-04: self-grade must be y or n"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_answers_file_errors(quiz, tmp_path, content, message):
    path = tmp_path / "answers.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_answers(path, quiz)


def test_shuffle_is_seeded(quiz):
    first = [q.id for q in order_questions(quiz, None, True, seed=7)]
    assert first == [q.id for q in order_questions(quiz, None, True, seed=7)]
    assert sorted(first) == [q.id for q in quiz.questions]
    others = {tuple(q.id for q in order_questions(quiz, None, True, seed=s)) for s in range(5)}
    assert len(others) > 1


def test_parse_choice_forms(quiz):
    multi = quiz.question("q-28-03")
    assert parse_choice("1,3,4", multi) == parse_choice(" 4 3 1 ", multi) == {1, 3, 4}
    with pytest.raises(ValueError, match="no option"):
        parse_choice("", multi)


def test_cli_take_through_stdin(quiz):
    ids = ["q-28-01", "q-28-02", "q-28-03", "q-28-04"]
    stdin = _lines(quiz.select(ids), wrong_ids={"q-28-02"})
    result = _cli("take", "--ids", ",".join(ids), stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("Score: 3/4")
    stopped = _cli("take", "--lang", "es", "--ids", ",".join(ids), stdin="4\n")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.rstrip().endswith("Terminado tras 1 de 4 preguntas.\nPuntuación: 1/1")


def test_cli_take_answers_file_full_score(quiz, tmp_path):
    path = tmp_path / "answers.yaml"
    answers = {q.id: (True if q.kind == "free" else list(q.answer)) for q in quiz.questions}
    path.write_text(yaml.safe_dump(answers), encoding="utf-8")
    result = _cli("take", "--answers", str(path), "--shuffle", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"Score: {len(quiz.questions)}/{len(quiz.questions)}")
    unknown = _cli("take", "--ids", "q-28-77")
    assert unknown.returncode == 1 and "q-28-77: no such question" in unknown.stderr
