"""The phase quiz: the YAML schema and loader (re-exported here), the checks that recompute its
answers from minituner's code, the mirror pages and the interactive quiz."""

from minituner.quiz.schema import (
    KINDS,
    LANGS,
    QUESTION_FIELDS,
    QUESTION_ID,
    QUIZ_ID,
    QUIZ_NAME,
    REQUIRED_FIELDS,
    Question,
    Quiz,
    QuizError,
    Text,
    Tolerant,
    default_quiz_path,
    load_quiz,
    parse_quiz,
    repo_root,
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
    "default_quiz_path",
    "load_quiz",
    "parse_quiz",
    "repo_root",
]
