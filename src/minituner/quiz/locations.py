"""Where the quiz's files live: inside the package, and in a checkout when there is one.

The quiz YAML and the committed experiment results ship with the package in
``minituner/quiz/data/`` and are found with :mod:`importlib.resources`, so an installed
minituner validates and checks its quiz from any working directory. In a checkout those two
package files are relative symlinks to the documented paths, ``data/quizzes/<quiz>.yaml`` (the
quiz's source of truth) and ``docs/results/phase-28.json`` (written by ``minituner experiment``):
one file each, so they cannot drift apart. Building a wheel or sdist copies the files the
symlinks point to (a test builds one and looks).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

QUIZ_NAME = "phase-28-lora-qlora"
RESULTS_NAME = "phase-28.json"
QUIZ_RELPATH = Path("data") / "quizzes" / f"{QUIZ_NAME}.yaml"
RESULTS_RELPATH = Path("docs") / "results" / RESULTS_NAME
PAGES_RELPATH = Path("docs") / "quizzes"


def package_file(name: str) -> Path:
    """Path of a data file shipped inside the package (``minituner/quiz/data/<name>``)."""
    return Path(str(resources.files("minituner.quiz").joinpath("data", name)))


def default_quiz_path(root: str | Path | None = None) -> Path:
    """The quiz YAML of checkout ``root``, or the package's copy when ``root`` is None."""
    if root is None:
        return package_file(f"{QUIZ_NAME}.yaml")
    return Path(root) / QUIZ_RELPATH


def default_results_path(root: str | Path | None = None) -> Path:
    """The results file of checkout ``root``, or the package's copy when ``root`` is None."""
    if root is None:
        return package_file(RESULTS_NAME)
    return Path(root) / RESULTS_RELPATH


def is_checkout(folder: Path) -> bool:
    """True when ``folder`` looks like a minituner checkout (quiz YAML and package sources)."""
    return (folder / QUIZ_RELPATH).is_file() and (folder / "src" / "minituner").is_dir()


def checkout_root() -> Path | None:
    """The checkout this package runs from (src layout), else the working directory when it is
    a checkout, else None (an installed package run elsewhere)."""
    for folder in (Path(__file__).resolve().parents[3], Path.cwd()):
        if is_checkout(folder):
            return folder
    return None
