"""Run the quiz's checks and compare what they compute with the YAML's answers.

A single/multi question's check returns the set of true option numbers, compared with
``answer``; a free question's check returns a dict of named values, compared with
``expected`` (numbers given as ``{value, tolerance}`` may differ by up to the tolerance,
anything else must be equal). A check that raises (a missing module or results file, say)
counts as a failure, never as a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from minituner.quiz.check import CHECKS
from minituner.quiz.locations import default_results_path
from minituner.quiz.schema import Question, Quiz, Tolerant

STATUSES = ("ok", "mismatch", "error")


@dataclass(frozen=True)
class CheckOutcome:
    """What one question's check computed and whether it agrees with the quiz."""

    id: str
    check: str
    status: str
    got: object
    want: object
    message: str = ""

    @property
    def passed(self) -> bool:
        """True when the check ran and agreed with the quiz."""
        return self.status == "ok"

    def to_dict(self) -> dict:
        """JSON-ready form, for ``minituner quiz check --json``."""
        return {
            "id": self.id,
            "check": self.check,
            "status": self.status,
            "got": self.got,
            "want": self.want,
            "message": self.message,
        }


def run_checks(quiz: Quiz, results: str | Path | None = None, ids: list | None = None) -> list:
    """Run the check of every selected question that has one, reading the results file
    ``results`` (default: the package's copy); returns CheckOutcomes in question order."""
    results = Path(results) if results is not None else default_results_path()
    outcomes = []
    for question in quiz.select(ids):
        if question.check is None:
            continue
        outcomes.append(run_one(question, CHECKS[question.check], results))
    return outcomes


def run_one(question: Question, fn, results: Path) -> CheckOutcome:
    """Run one check function on the results file and compare its result with the answer."""
    want = _plain(question.expected) if question.kind == "free" else sorted(question.answer)
    try:
        got = fn(results)
    except Exception as exc:  # any failure of a check is reported, never raised
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return CheckOutcome(question.id, question.check, "error", None, want, message)
    if question.kind == "free":
        problems = compare_expected(question.expected, got)
    else:
        problems = compare_options(question.answer_set, got)
    status = "mismatch" if problems else "ok"
    return CheckOutcome(question.id, question.check, status, _plain(got), want, "; ".join(problems))


def compare_options(answer: frozenset, got) -> list:
    """Problems (empty when none) between the true options a check found and the answer."""
    if not isinstance(got, (set, frozenset)) or not all(isinstance(n, int) for n in got):
        return [f"check returned {type(got).__name__}, not a set of option numbers"]
    if set(got) != set(answer):
        return [f"true options {sorted(got)} != answer {sorted(answer)}"]
    return []


def compare_expected(expected: dict, got) -> list:
    """Problems (empty when none) between a check's named values and the expected ones."""
    if not isinstance(got, dict):
        return [f"check returned {type(got).__name__}, not a dict of values"]
    problems = []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"{name}: not computed by the check")
        elif not _matches(want, got[name]):
            problems.append(f"{name}: got {_plain(got[name])!r}, want {_plain(want)!r}")
    return problems


def _matches(want, got) -> bool:
    if isinstance(want, Tolerant):
        wants = want.value if isinstance(want.value, list) else [want.value]
        gots = got if isinstance(got, (list, tuple)) else [got]
        same_shape = isinstance(want.value, list) == isinstance(got, (list, tuple))
        if not same_shape or len(wants) != len(gots):
            return False
        return all(_close(w, g, want.tolerance) for w, g in zip(wants, gots, strict=True))
    if isinstance(want, list):
        return (
            isinstance(got, (list, tuple))
            and len(want) == len(got)
            and all(_matches(w, g) for w, g in zip(want, got, strict=True))
        )
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(got, bool) and isinstance(want, bool) and want == got
    return want == got


def _close(want, got, tolerance: float) -> bool:
    if isinstance(got, bool) or not isinstance(got, (int, float)) or math.isnan(got):
        return False
    return abs(got - want) <= tolerance


def _plain(value):
    """JSON-friendly copy: sets become sorted lists, Tolerant becomes a dict."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Tolerant):
        return {"value": value.value, "tolerance": value.tolerance}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def format_table(outcomes: list) -> str:
    """A fixed-width text table of check outcomes, with a summary line."""
    rows = [("id", "check", "status", "got", "want")]
    for outcome in outcomes:
        status = "PASS" if outcome.passed else f"FAILED ({outcome.status})"
        got = outcome.message if outcome.status == "error" else _short(outcome.got)
        rows.append((outcome.id, outcome.check, status, got, _short(outcome.want)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        lines.append("  ".join([*padded, row[4]]))
    failed = sum(not outcome.passed for outcome in outcomes)
    lines.append(f"{len(outcomes) - failed}/{len(outcomes)} checks passed")
    for outcome in outcomes:
        if outcome.status == "mismatch":
            lines.append(f"{outcome.id}: {outcome.message}")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, dict) and set(value) == {"value", "tolerance"}:
        return f"{_short(value['value'])}±{_short(value['tolerance'])}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
