"""``minituner report``: REPORT.md with tables and plots from run folders."""

from __future__ import annotations

import os
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report", help="write REPORT.md from run, sweep or experiment folders",
        description="Tables (runs, slices, memory, sweep, QLoRA, ablation) and PNG plots; every "
                    "number is read from the folders' JSON files.",
    )
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR",
                        help="fine-tuning runs, sweep folders, experiment folders or bases")
    parser.add_argument("--out", default=None,
                        help="report path (default: REPORT.md in the folders' common parent "
                             "folder, or in the folder itself when only one is given)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Write the report and print its path."""
    from minituner.course.report import write_report

    for folder in args.folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: folder not found")
    if args.out:
        out = Path(args.out)
    else:  # the folders' common parent (the folder itself when only one is given)
        out = Path(os.path.commonpath([str(Path(f).resolve()) for f in args.folders]))
        out = out / "REPORT.md"
    print(f"report -> {write_report(args.folders, out)}")
    return 0
