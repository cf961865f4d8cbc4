"""``minituner report``: REPORT.md with tables and plots from run folders."""

from __future__ import annotations

import os
from pathlib import Path

from minituner.cli.runfolders import TRANSFORMERS, read_run_folder


def register(subparsers) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report", help="write REPORT.md from run, sweep or experiment folders",
        description="Tables (runs, slices, memory, sweep, QLoRA, ablation) and PNG plots; every "
                    "number is read from the folders' JSON files.",
    )
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR",
                        help="fine-tuning runs (Mini-GPT or transformers), sweep folders, "
                             "experiment folders or bases")
    parser.add_argument("--out", default=None,
                        help="report path (default: REPORT.md in the folders' common parent "
                             "folder, or in the folder itself when only one is given)")
    parser.set_defaults(func=run)


def split_transformers_runs(folders: list) -> tuple:
    """(other folders, transformers run folders), told apart by each run's config.json."""
    others, transformers = [], []
    for folder in map(Path, folders):
        summary = (folder / "sweep.json").is_file() or (folder / "experiment.json").is_file()
        if not summary and (folder / "config.json").is_file() and \
                read_run_folder(folder).model_kind == TRANSFORMERS:
            if not (folder / "results.json").is_file():
                raise ValueError(f"{folder / 'results.json'}: not found (the run has not "
                                 "finished)")
            transformers.append(folder)
        else:
            others.append(folder)
    return others, transformers


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
    others, transformers = split_transformers_runs(args.folders)
    print(f"report -> {write_report(others, out, transformers_runs=transformers)}")
    return 0
