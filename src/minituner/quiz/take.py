"""Taking the quiz in a terminal: ask, grade, explain, and keep score.

:func:`take_quiz` reads answers from one text stream and writes to another, so the CLI passes
``sys.stdin``/``sys.stdout`` and tests pass ``io.StringIO``. Choice answers are option numbers
(``2`` or ``1,3,4``); for a free question the model answer is shown and the taker grades
themself (y/n). Answers can also come from a mapping (id -> answer, see :func:`load_answers`)
for scripting. End of input or Ctrl-C ends the quiz cleanly with the score so far.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import yaml

from minituner.quiz.schema import Question, Quiz

YES = ("y", "yes", "s", "si", "sí")
NO = ("n", "no")
UI = {
    "en": {
        "single": "single choice", "multi": "select every true option", "free": "free answer",
        "ask_single": "Your answer (one number, e.g. 2): ",
        "ask_multi": "Your answer (numbers separated by commas, e.g. 1,3): ",
        "ask_free": "Your answer (Enter when done): ",
        "ask_grade": "Did your answer match? [y/n]: ",
        "from_file": "Your answer (from the answers file): {answer}",
        "model_answer": "Model answer: {text}",
        "correct": "Correct.", "wrong": "Not quite. The answer is {answer}.",
        "self_yes": "Counted as correct.", "self_no": "Counted as not correct.",
        "bad_grade": "Please answer y or n.",
        "score": "Score: {correct}/{answered}",
        "stopped": "Stopped after {answered} of {total} questions.",
        "seed": "Question order shuffled with seed {seed}.",
    },
    "es": {
        "single": "una sola respuesta", "multi": "marca todas las opciones verdaderas",
        "free": "respuesta libre",
        "ask_single": "Tu respuesta (un número, p. ej. 2): ",
        "ask_multi": "Tu respuesta (números separados por comas, p. ej. 1,3): ",
        "ask_free": "Tu respuesta (pulsa Intro al terminar): ",
        "ask_grade": "¿Coincide tu respuesta? [s/n]: ",
        "from_file": "Tu respuesta (del fichero de respuestas): {answer}",
        "model_answer": "Respuesta modelo: {text}",
        "correct": "Correcto.", "wrong": "No exactamente. La respuesta es {answer}.",
        "self_yes": "Cuenta como correcta.", "self_no": "No cuenta como correcta.",
        "bad_grade": "Responde s o n.",
        "score": "Puntuación: {correct}/{answered}",
        "stopped": "Terminado tras {answered} de {total} preguntas.",
        "seed": "Orden de las preguntas barajado con la semilla {seed}.",
    },
}


class EndOfQuiz(Exception):
    """The input ended (EOF) before the quiz did."""


@dataclass
class TakeResult:
    """Outcome of one sitting: per-question correctness in the order asked, and totals."""

    total: int
    graded: list = field(default_factory=list)
    stopped: bool = False

    @property
    def answered(self) -> int:
        """How many questions were answered and graded."""
        return len(self.graded)

    @property
    def correct(self) -> int:
        """How many of them were right."""
        return sum(ok for _, ok in self.graded)


def parse_choice(text: str, question: Question) -> frozenset:
    """Option numbers from ``2`` / ``1,3,4`` / ``1 3 4``; ValueError says what is wrong."""
    tokens = [t for t in re.split(r"[\s,;]+", str(text).strip()) if t]
    if not tokens:
        raise ValueError("no option given")
    n_options = len(question.options)
    numbers = set()
    for token in tokens:
        if not token.isdigit():
            raise ValueError(f"{token!r} is not an option number")
        number = int(token)
        if not 1 <= number <= n_options:
            raise ValueError(f"option {number} out of range 1..{n_options}")
        numbers.add(number)
    if question.kind == "single" and len(numbers) != 1:
        raise ValueError("choose exactly one option")
    return frozenset(numbers)


def parse_grade(value) -> bool:
    """A self-grade: True/False, or y/yes/s/sí versus n/no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in YES:
        return True
    if text in NO:
        return False
    raise ValueError(f"self-grade must be y or n, got {value!r}")


def load_answers(path: str | Path, quiz: Quiz) -> dict:
    """Read a YAML/JSON mapping id -> answer and validate every entry against the quiz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: answers file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping of question id to answer")
    answers = {}
    for qid, value in data.items():
        try:
            question = quiz.question(str(qid))
        except ValueError:
            raise ValueError(f"{path}: {qid}: no such question in quiz {quiz.id}") from None
        try:
            answers[question.id] = _parse_file_answer(value, question)
        except ValueError as exc:
            raise ValueError(f"{path}: {qid}: {exc}") from None
    return answers


def _parse_file_answer(value, question: Question):
    if question.kind == "free":
        return parse_grade(value)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, bool):
        raise ValueError(f"expected option numbers, got {value!r}")
    return parse_choice(str(value), question)


def order_questions(quiz: Quiz, ids: list | None, shuffle: bool, seed: int | None) -> list:
    """The questions to ask: those in ``ids`` (or all), shuffled by ``seed`` when asked."""
    questions = quiz.select(ids)
    if shuffle:
        random.Random(seed).shuffle(questions)
    return questions


def take_quiz(
    quiz: Quiz,
    stdin: TextIO,
    stdout: TextIO,
    lang: str = "en",
    ids: list | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    answers: dict | None = None,
) -> TakeResult:
    """Ask the questions on ``stdout``, read answers from ``stdin`` (or ``answers``), score."""
    if lang not in UI:
        raise ValueError(f"lang: unsupported language {lang!r} (choose from {list(UI)})")
    questions = order_questions(quiz, ids, shuffle, seed)
    ui = UI[lang]
    result = TakeResult(total=len(questions))
    if shuffle:
        _say(stdout, ui["seed"].format(seed=seed))
    try:
        for index, question in enumerate(questions, 1):
            _say(stdout, _header(question, index, len(questions), lang))
            ok = _ask(question, stdin, stdout, lang, (answers or {}).get(question.id))
            result.graded.append((question.id, ok))
            _say(stdout, question.explanation.get(lang) + "\n")
    except (EndOfQuiz, KeyboardInterrupt):
        result.stopped = True
        _say(stdout, "")
    if result.stopped:
        _say(stdout, ui["stopped"].format(answered=result.answered, total=result.total))
    _say(stdout, ui["score"].format(correct=result.correct, answered=result.answered))
    return result


def _header(question: Question, index: int, count: int, lang: str) -> str:
    lines = [
        f"[{index}/{count}] {question.id}: {question.title.get(lang)} ({UI[lang][question.kind]})",
        question.prompt.get(lang),
    ]
    lines += [f"  {n}. {option.get(lang)}" for n, option in enumerate(question.options, 1)]
    return "\n".join(lines)


def _ask(question: Question, stdin: TextIO, stdout: TextIO, lang: str, scripted) -> bool:
    ui = UI[lang]
    if question.kind == "free":
        if scripted is None:
            _read(stdin, stdout, ui["ask_free"])
        _say(stdout, ui["model_answer"].format(text=question.answer.get(lang)))
        grade = scripted if scripted is not None else _read_grade(stdin, stdout, ui)
        _say(stdout, ui["self_yes"] if grade else ui["self_no"])
        return grade
    if scripted is not None:
        chosen = scripted
        _say(stdout, ui["from_file"].format(answer=_numbers(chosen)))
    else:
        chosen = _read_choice(question, stdin, stdout, ui)
    ok = chosen == question.answer_set
    _say(stdout, ui["correct"] if ok else ui["wrong"].format(answer=_numbers(question.answer)))
    return ok


def _read_choice(question: Question, stdin: TextIO, stdout: TextIO, ui: dict) -> frozenset:
    prompt = ui["ask_single"] if question.kind == "single" else ui["ask_multi"]
    while True:
        try:
            return parse_choice(_read(stdin, stdout, prompt), question)
        except ValueError as exc:
            _say(stdout, f"  {exc}")


def _read_grade(stdin: TextIO, stdout: TextIO, ui: dict) -> bool:
    while True:
        try:
            return parse_grade(_read(stdin, stdout, ui["ask_grade"]))
        except ValueError:
            _say(stdout, f"  {ui['bad_grade']}")


def _read(stdin: TextIO, stdout: TextIO, prompt: str) -> str:
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EndOfQuiz
    return line.rstrip("\r\n")


def _say(stdout: TextIO, text: str) -> None:
    stdout.write(text + "\n")
    stdout.flush()


def _numbers(numbers) -> str:
    return ", ".join(str(n) for n in sorted(numbers))
