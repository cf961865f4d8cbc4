"""The phase quiz: schema and validating loader.

``data/quizzes/phase-28-lora-qlora.yaml`` is the source of truth (the package carries it; see
:mod:`minituner.quiz.locations`). Every question has an id
(``q-28-NN``), a kind (single, multi or free), English and Spanish text, an answer and
optionally a ``check``: the name of a function in :mod:`minituner.quiz.check` that recomputes
the answer from minituner's own code, so the quiz cannot drift away from what the library
does. Loading validates everything and names the question id and the field in each error
(``q-28-03.options[2]: missing translation 'es'``; option numbers are 1-based, like answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from minituner.quiz.check import CHECKS
from minituner.quiz.locations import default_quiz_path

LANGS = ("en", "es")
KINDS = ("single", "multi", "free")
QUESTION_ID = re.compile(r"^q-(\d{2})-(\d{2})$")
QUIZ_ID = re.compile(r"^phase-(\d{2})(-[a-z0-9]+)+$")
QUESTION_FIELDS = {
    "id", "kind", "title", "prompt", "explanation", "options", "answer", "tags", "check",
    "expected",
}
REQUIRED_FIELDS = ("id", "kind", "title", "prompt", "explanation", "answer", "tags")


class QuizError(ValueError):
    """A quiz file that breaks the schema; the message names the question id and field."""


@dataclass(frozen=True)
class Text:
    """One piece of quiz text in every supported language."""

    en: str
    es: str

    def get(self, lang: str) -> str:
        """The text in ``lang`` (one of LANGS)."""
        if lang not in LANGS:
            raise ValueError(f"lang: unsupported language {lang!r} (choose from {list(LANGS)})")
        return getattr(self, lang)


@dataclass(frozen=True)
class Tolerant:
    """An expected number (or list of numbers) that may differ by up to ``tolerance``."""

    value: float | list
    tolerance: float


@dataclass(frozen=True)
class Question:
    """One quiz question; ``answer`` is a tuple of 1-based option numbers, or a Text for free."""

    id: str
    kind: str
    title: Text
    prompt: Text
    explanation: Text
    options: tuple
    answer: tuple | Text
    tags: tuple
    check: str | None = None
    expected: dict | None = None

    @property
    def answer_set(self) -> frozenset:
        """The correct option numbers of a single/multi question."""
        if self.kind == "free":
            raise ValueError(f"{self.id}: a free question has no option numbers")
        return frozenset(self.answer)


@dataclass(frozen=True)
class Quiz:
    """A validated quiz: its id, title and questions in file order."""

    id: str
    title: Text
    questions: tuple

    def question(self, question_id: str) -> Question:
        """The question with this id (ValueError naming the id if absent)."""
        for question in self.questions:
            if question.id == question_id:
                return question
        raise ValueError(f"{question_id}: no such question in quiz {self.id}")

    def select(self, ids: list | None) -> list:
        """The questions named by ``ids`` in that order, or all of them when ``ids`` is None."""
        if not ids:
            return list(self.questions)
        return [self.question(question_id) for question_id in ids]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with the same key twice (YAML would keep the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise QuizError(f"line {line}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_quiz(path: str | Path | None = None) -> Quiz:
    """Read and validate a quiz YAML file (default: the package's copy); errors start with the
    file name."""
    path = Path(path) if path is not None else default_quiz_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: quiz file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except QuizError as exc:
        raise QuizError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise QuizError(f"{path}: not valid YAML ({detail})") from None
    try:
        return parse_quiz(data)
    except QuizError as exc:
        raise QuizError(f"{path}: {exc}") from None


def parse_quiz(data) -> Quiz:
    """Validate the parsed YAML structure and build a Quiz."""
    if not isinstance(data, dict):
        raise QuizError("top level must be a mapping with 'quiz' and 'questions'")
    _reject_unknown(set(data), {"quiz", "questions"}, "top level")
    for key in ("quiz", "questions"):
        if key not in data:
            raise QuizError(f"top level: missing field '{key}'")
    header = data["quiz"]
    if not isinstance(header, dict):
        raise QuizError("quiz: must be a mapping with 'id' and 'title'")
    _reject_unknown(set(header), {"id", "title"}, "quiz")
    quiz_id = header.get("id")
    if not isinstance(quiz_id, str) or not QUIZ_ID.match(quiz_id):
        raise QuizError(f"quiz.id: must look like 'phase-28-lora-qlora', got {quiz_id!r}")
    title = _text(header.get("title"), "quiz.title")
    phase = QUIZ_ID.match(quiz_id).group(1)
    raw_questions = data["questions"]
    if not isinstance(raw_questions, list) or not raw_questions:
        raise QuizError("questions: must be a non-empty list")
    questions, first_seen = [], {}
    for index, raw in enumerate(raw_questions):
        question = _question(raw, index, phase)
        if question.id in first_seen:
            raise QuizError(
                f"{question.id}.id: duplicate id (questions[{first_seen[question.id]}] "
                f"and questions[{index}])"
            )
        first_seen[question.id] = index
        questions.append(question)
    return Quiz(id=quiz_id, title=title, questions=tuple(questions))


def _question(raw, index: int, phase: str) -> Question:
    where = f"questions[{index}]"
    if not isinstance(raw, dict):
        raise QuizError(f"{where}: must be a mapping")
    qid = raw.get("id")
    match = QUESTION_ID.match(qid) if isinstance(qid, str) else None
    if match is None:
        raise QuizError(f"{where}.id: bad id format {qid!r} (expected 'q-{phase}-NN')")
    if match.group(1) != phase:
        raise QuizError(f"{qid}.id: phase {match.group(1)} does not match quiz phase {phase}")
    _reject_unknown(set(raw), QUESTION_FIELDS, qid)
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise QuizError(f"{qid}.{name}: missing field")
    kind = raw["kind"]
    if kind not in KINDS:
        raise QuizError(f"{qid}.kind: unknown kind {kind!r} (choose from {list(KINDS)})")
    options = _options(raw.get("options"), kind, qid)
    answer = _answer(raw["answer"], kind, len(options), qid)
    check = _check_name(raw.get("check"), qid)
    expected = _expected(raw.get("expected"), kind, check, qid)
    return Question(
        id=qid,
        kind=kind,
        title=_text(raw["title"], f"{qid}.title"),
        prompt=_text(raw["prompt"], f"{qid}.prompt"),
        explanation=_text(raw["explanation"], f"{qid}.explanation"),
        options=options,
        answer=answer,
        tags=_tags(raw["tags"], qid),
        check=check,
        expected=expected,
    )


def _reject_unknown(keys: set, allowed: set, where: str) -> None:
    unknown = sorted(str(key) for key in keys - allowed)
    if unknown:
        raise QuizError(f"{where}: unknown field '{unknown[0]}'")


def _text(value, where: str) -> Text:
    if not isinstance(value, dict):
        raise QuizError(f"{where}: must be a mapping of language to text ({'/'.join(LANGS)})")
    for lang in value:
        if lang not in LANGS:
            raise QuizError(f"{where}: unknown language {lang!r}")
    for lang in LANGS:
        if lang not in value:
            raise QuizError(f"{where}: missing translation '{lang}'")
        text = value[lang]
        if not isinstance(text, str) or not text.strip():
            raise QuizError(f"{where}: empty translation '{lang}'")
    return Text(**{lang: value[lang].strip() for lang in LANGS})


def _options(value, kind: str, qid: str) -> tuple:
    if kind == "free":
        if value is not None:
            raise QuizError(f"{qid}.options: a free question takes no options")
        return ()
    if not isinstance(value, list) or len(value) < 2:
        raise QuizError(f"{qid}.options: a {kind} question needs a list of at least 2 options")
    return tuple(_text(option, f"{qid}.options[{n}]") for n, option in enumerate(value, 1))


def _answer(value, kind: str, n_options: int, qid: str):
    where = f"{qid}.answer"
    if kind == "free":
        return _text(value, where)
    if not isinstance(value, list) or not value:
        raise QuizError(f"{where}: must be a non-empty list of option numbers")
    for number in value:
        if not isinstance(number, int) or isinstance(number, bool):
            raise QuizError(f"{where}: option numbers must be integers, got {number!r}")
        if not 1 <= number <= n_options:
            raise QuizError(f"{where}: option {number} out of range 1..{n_options}")
    if len(set(value)) != len(value):
        raise QuizError(f"{where}: repeated option number")
    if kind == "single" and len(value) != 1:
        raise QuizError(f"{where}: a single question needs exactly 1 answer, got {len(value)}")
    return tuple(sorted(value))


def _tags(value, qid: str) -> tuple:
    if not isinstance(value, list) or not value:
        raise QuizError(f"{qid}.tags: must be a non-empty list of strings")
    for tag in value:
        if not isinstance(tag, str) or not tag.strip():
            raise QuizError(f"{qid}.tags: every tag must be a non-empty string, got {tag!r}")
    return tuple(value)


def _check_name(value, qid: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in CHECKS:
        raise QuizError(f"{qid}.check: unknown check {value!r} (not in minituner.quiz.check)")
    return value


def _expected(value, kind: str, check: str | None, qid: str) -> dict | None:
    where = f"{qid}.expected"
    if value is None:
        if check is not None and kind == "free":
            raise QuizError(f"{where}: a free question with a check needs expected values")
        return None
    if check is None:
        raise QuizError(f"{where}: expected values need a check")
    if kind != "free":
        raise QuizError(f"{where}: a {kind} question's check is compared with its answer")
    if not isinstance(value, dict) or not value:
        raise QuizError(f"{where}: must be a non-empty mapping of name to value")
    return {str(name): _expected_value(item, f"{where}.{name}") for name, item in value.items()}


def _expected_value(item, where: str):
    if isinstance(item, dict):
        if set(item) != {"value", "tolerance"}:
            raise QuizError(f"{where}: a toleranced number needs exactly 'value' and 'tolerance'")
        tolerance = item["tolerance"]
        if not _is_number(tolerance) or tolerance < 0:
            raise QuizError(f"{where}.tolerance: must be a number >= 0, got {tolerance!r}")
        numbers = item["value"] if isinstance(item["value"], list) else [item["value"]]
        if not numbers or not all(_is_number(n) for n in numbers):
            raise QuizError(f"{where}.value: must be a number or a list of numbers")
        return Tolerant(value=item["value"], tolerance=float(tolerance))
    plain = item if isinstance(item, list) else [item]
    if not all(isinstance(v, (bool, int, float, str)) for v in plain):
        raise QuizError(f"{where}: must be a number, bool, string or a list of them")
    return item


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
