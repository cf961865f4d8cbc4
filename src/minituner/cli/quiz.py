"""``minituner quiz``: validate, render, take and check the phase quiz."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minituner.cli.common import nonneg_int


def register(subparsers) -> None:
    """Add ``quiz`` with its subcommands validate, render, take and check."""
    parser = subparsers.add_parser(
        "quiz", help="the phase quiz: validate, render, take, check",
        description="Work with the phase quiz (data/quizzes/*.yaml is the source of truth; "
                    "minituner carries a copy, so the quiz works outside a checkout too).",
    )
    quiz_commands = parser.add_subparsers(dest="quiz_command", metavar="SUBCOMMAND")
    quiz_commands.required = True

    validate = quiz_commands.add_parser("validate", help="load the quiz and report problems")
    _common(validate)
    validate.set_defaults(func=run_validate)

    render = quiz_commands.add_parser("render", help="write the Markdown pages (en, es)")
    _common(render)
    render.add_argument(
        "--out-dir", help="where to write the pages (default docs/quizzes of the checkout)"
    )
    render.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the pages are stale"
    )
    render.set_defaults(func=run_render)

    take = quiz_commands.add_parser("take", help="take the quiz in the terminal")
    _common(take)
    take.add_argument("--lang", choices=["en", "es"], default="en")
    take.add_argument("--ids", help="comma-separated question ids, e.g. q-28-01,q-28-03")
    take.add_argument("--shuffle", action="store_true", help="shuffle the question order")
    take.add_argument("--seed", type=nonneg_int, help="seed for --shuffle (printed if omitted)")
    take.add_argument("--answers", help="YAML/JSON file mapping question id -> answer")
    take.set_defaults(func=run_take)

    check = quiz_commands.add_parser("check", help="recompute checked answers with minituner")
    _common(check)
    check.add_argument(
        "--results",
        help="results JSON the results questions read (default docs/results/phase-28.json "
             "of the checkout, else the copy installed with minituner)",
    )
    check.add_argument("--ids", help="comma-separated question ids (default: all)")
    check.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    check.set_defaults(func=run_check)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        help="checkout root (default: the checkout minituner runs from or the working directory "
             "when it is one, else the files installed with minituner)",
    )
    parser.add_argument(
        "--quiz",
        help="quiz YAML (default data/quizzes/phase-28-lora-qlora.yaml of the checkout, else "
             "the copy installed with minituner)",
    )


def _root(args) -> Path | None:
    """The checkout to read from and write to, or None for the package's own files."""
    from minituner.quiz.locations import checkout_root

    return Path(args.root) if args.root else checkout_root()


def _load(args):
    from minituner.quiz.locations import default_quiz_path
    from minituner.quiz.schema import load_quiz

    root = _root(args)
    path = Path(args.quiz) if args.quiz else default_quiz_path(root)
    return root, load_quiz(path)


def _ids(text: str | None) -> list | None:
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def run_validate(args) -> int:
    """Load the quiz; any schema error becomes a one-line message and exit 1."""
    _, quiz = _load(args)
    checked = sum(q.check is not None for q in quiz.questions)
    print(f"{quiz.id}: {len(quiz.questions)} questions valid ({checked} with a check)")
    return 0


def run_render(args) -> int:
    """Write (or with --check, compare) the English and Spanish pages."""
    from minituner.quiz.locations import PAGES_RELPATH
    from minituner.quiz.page import stale_pages, write_pages

    root, quiz = _load(args)
    if args.out_dir is None and root is None:
        raise ValueError("--out-dir: not in a minituner checkout; name where to write the pages")
    out_dir = Path(args.out_dir) if args.out_dir else root / PAGES_RELPATH
    if args.check:
        stale = stale_pages(quiz, out_dir)
        if stale:
            print(f"stale quiz pages in {out_dir}: {', '.join(stale)} "
                  "(run `minituner quiz render`)", file=sys.stderr)
            return 1
        print(f"quiz pages in {out_dir} are up to date")
        return 0
    for path in write_pages(quiz, out_dir):
        print(f"wrote {path}")
    return 0


def run_take(args) -> int:
    """Ask the questions on this terminal (or from --answers) and print the score."""
    from minituner.quiz.take import load_answers, take_quiz

    _, quiz = _load(args)
    ids = _ids(args.ids)
    quiz.select(ids)  # unknown ids fail before the first question
    answers = load_answers(args.answers, quiz) if args.answers else None
    seed = args.seed
    if args.shuffle and seed is None:
        seed = int.from_bytes(os.urandom(4), "big")
    take_quiz(
        quiz, sys.stdin, sys.stdout, lang=args.lang, ids=ids,
        shuffle=args.shuffle, seed=seed, answers=answers,
    )
    return 0


def run_check(args) -> int:
    """Run every check; print a table (or JSON); exit 1 on any failure."""
    from minituner.quiz.locations import default_results_path
    from minituner.quiz.verify import format_table, run_checks

    root, quiz = _load(args)
    results = Path(args.results) if args.results else default_results_path(root)
    outcomes = run_checks(quiz, results, _ids(args.ids))
    if args.json:
        print(json.dumps([outcome.to_dict() for outcome in outcomes], indent=2))
    else:
        sys.stdout.write(format_table(outcomes))
    return 0 if all(outcome.passed for outcome in outcomes) else 1
