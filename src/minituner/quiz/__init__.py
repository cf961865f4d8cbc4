"""The phase quiz: the YAML schema, loader and file locations (re-exported here), the checks
that recompute its answers from minituner's code, the mirror pages and the interactive quiz."""

from minituner.quiz.locations import (
    QUIZ_NAME,
    checkout_root,
    default_quiz_path,
    default_results_path,
)
from minituner.quiz.schema import (
    KINDS,
    LANGS,
    QUESTION_FIELDS,
    QUESTION_ID,
    QUIZ_ID,
    REQUIRED_FIELDS,
    Question,
    Quiz,
    QuizError,
    Text,
    Tolerant,
    load_quiz,
    parse_quiz,
)

__all__ = [
    "KINDS",
    "LANGS",
    "QUESTION_FIELDS",
    "QUESTION_ID",
    "QUIZ_ID",
    "QUIZ_NAME",
    "Question",
    "Quiz",
    "QuizError",
    "REQUIRED_FIELDS",
    "Text",
    "Tolerant",
    "checkout_root",
    "default_quiz_path",
    "default_results_path",
    "load_quiz",
    "parse_quiz",
]
