"""The ``minituner`` command line: a thin layer over the library.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a handler taking the parsed args and returning an exit
code. Library errors (ValueError, OSError) become a one-line message and exit status 1;
argparse's usage errors are one line too (every subcommand's, applied here) and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = [
    "corpus",
    "pretrain",
    "generate",
    "demo",
    "count",
    "quiz",
    "memory",
    "finetune",
    "eval",
    "sweep",
    "report",
    "experiment",
    "merge",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="minituner", description="LoRA and QLoRA fine-tuning from first principles."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"minituner.cli.{name}")
        module.register(subparsers)
    _one_line_errors_everywhere(parser)
    return parser


def _one_line_errors_everywhere(parser: argparse.ArgumentParser) -> None:
    """Usage errors of the parser and every (nested) subcommand become one stderr line."""
    from minituner.cli.trainflags import one_line_errors

    one_line_errors(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                _one_line_errors_everywhere(subparser)


# Log lines of other packages that a user of minituner cannot act on, printed when
# transformers imports torchao: its compiled extensions failing to load in a CPU or mismatched
# build, and torch's notice about torchao registering Enum pytree constants. (logger, message
# start); every other record of these loggers still shows.
FOREIGN_NOISE = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)


class _DropMessages(logging.Filter):
    """Drops log records whose unformatted message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_foreign_noise() -> None:
    """Filter the :data:`FOREIGN_NOISE` records out of their loggers (once per process)."""
    for name, prefix in FOREIGN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


def main(argv: list | None = None) -> int:
    """Entry point of the ``minituner`` console script."""
    silence_foreign_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("minituner: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"minituner {args.command}: error: {message}", file=sys.stderr)
        return 1
    return int(code or 0)
