"""The quiz's readable mirror: one Markdown page per language, generated from the YAML.

Each page links to the other language, says that the YAML is the source of truth, and shows
every question with its options, the answer and explanation folded inside a ``<details>``
block. The output depends only on the quiz, so rendering twice gives the same bytes and a test
can tell when the committed pages are out of date.
"""

from __future__ import annotations

from pathlib import Path

from minituner.quiz.schema import LANGS, Question, Quiz
from minituner.util.files import atomic_write_text

LABELS = {
    "en": {
        "language": "English",
        "answer": "Answer",
        "model_answer": "Model answer",
        "single": "Single choice",
        "multi": "Select every true option",
        "free": "Free answer",
        "source": (
            "Generated from [`{source}`]({source_link}), the source of truth: edit the YAML and "
            "run `minituner quiz render`, never this page. Take the quiz in a terminal with "
            "`minituner quiz take{lang_flag}`; `minituner quiz check` recomputes the checked "
            "answers with minituner's own code."
        ),
        "tags": "Tags",
    },
    "es": {
        "language": "Español",
        "answer": "Respuesta",
        "model_answer": "Respuesta modelo",
        "single": "Una sola respuesta",
        "multi": "Marca todas las opciones verdaderas",
        "free": "Respuesta libre",
        "source": (
            "Generada a partir de [`{source}`]({source_link}), la fuente de verdad: edita el "
            "YAML y ejecuta `minituner quiz render`, nunca esta página. Haz el cuestionario en "
            "una terminal con `minituner quiz take{lang_flag}`; `minituner quiz check` vuelve a "
            "calcular las respuestas comprobables con el propio código de minituner."
        ),
        "tags": "Etiquetas",
    },
}
SOURCE = "data/quizzes/{name}.yaml"


def page_name(quiz: Quiz, lang: str) -> str:
    """File name of the page for ``lang``: ``<quiz id>.md`` in English, ``<quiz id>.<lang>.md``."""
    if lang not in LANGS:
        raise ValueError(f"lang: unsupported language {lang!r} (choose from {list(LANGS)})")
    return f"{quiz.id}.md" if lang == "en" else f"{quiz.id}.{lang}.md"


def render_page(quiz: Quiz, lang: str) -> str:
    """The whole Markdown page for ``lang``."""
    labels = LABELS[lang]
    switch = " · ".join(
        f"**{LABELS[other]['language']}**"
        if other == lang
        else f"[{LABELS[other]['language']}]({page_name(quiz, other)})"
        for other in LANGS
    )
    source = SOURCE.format(name=quiz.id)
    note = labels["source"].format(
        source=source,
        source_link=f"../../{source}",
        lang_flag="" if lang == "en" else f" --lang {lang}",
    )
    parts = [f"# {quiz.title.get(lang)}", switch, f"> {note}"]
    parts.extend(render_question(question, lang) for question in quiz.questions)
    return "\n\n".join(parts) + "\n"


def render_question(question: Question, lang: str) -> str:
    """One question's Markdown section: heading, prompt, options and the folded answer."""
    labels = LABELS[lang]
    lines = [
        f"## {question.id}: {question.title.get(lang)}",
        "",
        f"*{labels[question.kind]}*",
        "",
        question.prompt.get(lang),
        "",
    ]
    for number, option in enumerate(question.options, 1):
        lines.append(f"{number}. {option.get(lang)}")
    if question.options:
        lines.append("")
    lines += [f"<details><summary>{labels['answer']}</summary>", "", _answer_text(question, lang)]
    lines += ["", question.explanation.get(lang), ""]
    lines += [f"{labels['tags']}: " + ", ".join(f"`{tag}`" for tag in question.tags), ""]
    lines.append("</details>")
    return "\n".join(lines)


def _answer_text(question: Question, lang: str) -> str:
    if question.kind == "free":
        return f"**{LABELS[lang]['model_answer']}:** {question.answer.get(lang)}"
    chosen = [f"**{n}.** {question.options[n - 1].get(lang)}" for n in question.answer]
    return "\n".join(f"- {item}" for item in chosen) if len(chosen) > 1 else chosen[0]


def render_pages(quiz: Quiz) -> dict:
    """Every page as {file name: text}, in memory."""
    return {page_name(quiz, lang): render_page(quiz, lang) for lang in LANGS}


def write_pages(quiz: Quiz, out_dir: str | Path) -> list:
    """Render every page and write it atomically under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    return [atomic_write_text(out_dir / name, text) for name, text in render_pages(quiz).items()]


def stale_pages(quiz: Quiz, out_dir: str | Path) -> list:
    """Names of the pages under ``out_dir`` that are missing or differ from a fresh render."""
    out_dir = Path(out_dir)
    stale = []
    for name, text in render_pages(quiz).items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale
