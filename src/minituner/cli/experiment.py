"""``minituner experiment``: every run of the phase-28 experiment, its report and results file."""

from __future__ import annotations

import shlex

from minituner.cli.common import positive_float, positive_int
from minituner.cli.trainflags import (
    Progress,
    add_training_flags,
    apply_threads,
    config_from_args,
)


def register(subparsers) -> None:
    """Add the ``experiment`` subcommand."""
    parser = subparsers.add_parser(
        "experiment", help="run the whole experiment: lr search, LoRA r=8 vs full FT, "
                           "ablation, rank sweep, QLoRA, report, results JSON",
        description="Learning-rate search (LoRA r=8 and full fine-tuning, same grid, chosen by "
                    "validation loss), the anti-forgetting ablation (none / replay / KL / both), "
                    "the rank sweep, a one-epoch QLoRA r=8 run, REPORT.md, and optionally the "
                    "results file the quiz reads.",
    )
    add_training_flags(parser, method=False)
    parser.add_argument("--base", default=None,
                        help="pretrained base run (default: pretrain one into OUT/base)")
    parser.add_argument("--out", required=True, help="experiment folder")
    parser.add_argument("--lr-grid", default="1e-3,3e-3,1e-2",
                        help="learning rates searched for LoRA and full FT (default "
                             "1e-3,3e-3,1e-2)")
    parser.add_argument("--ranks", default="0,2,4,8,16,32", help="rank sweep ranks")
    parser.add_argument("--qlora-epochs", type=positive_float, default=1.0,
                        help="epochs of the QLoRA run (default 1)")
    parser.add_argument("--qlora-batch-size", type=positive_int, default=8,
                        help="batch size of the QLoRA run (default 8: more updates in its one "
                             "epoch)")
    parser.add_argument("--repeat-seeds", default="1,2",
                        help="other seeds the r=8 run is repeated with (default 1,2; '' for none)")
    parser.add_argument("--variant-seeds", default="0,1,2",
                        help="seeds of the adapter-variant table (default 0,1,2; '' for no "
                             "table)")
    parser.add_argument("--only", choices=("variants",), default=None,
                        help="run one part alone on an existing --base: 'variants' is the "
                             "adapter-variant table (LoRA, DoRA, PiSSA, LoRA+, QLoRA, LoftQ at "
                             "r=8, seeds 0,1,2) into OUT, at --lr (default 1e-2, the searched lr)")
    parser.add_argument("--results-json", default=None, metavar="PATH",
                        help="also write the quiz's results file here "
                             "(docs/results/phase-28.json)")
    parser.set_defaults(func=run)


def _seeds(text: str, flag: str = "--repeat-seeds") -> list:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{flag} must be distinct non-negative integers, got {text!r}")
    return seeds


def _grid(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--lr-grid must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--lr-grid must hold positive learning rates, got {text!r}")
    return values


# Flags of the whole experiment that --only variants does not use, with their defaults.
WHOLE_EXPERIMENT_FLAGS = {"lr_grid": "1e-3,3e-3,1e-2", "ranks": "0,2,4,8,16,32",
                          "qlora_epochs": 1.0, "qlora_batch_size": 8, "repeat_seeds": "1,2",
                          "results_json": None}


def check_only(args) -> None:
    """Refuse --only without --base, and flags of the whole experiment that it would ignore."""
    if args.only is None:
        return
    if not args.base:
        raise ValueError(f"--only {args.only} needs --base (an existing pretrained base run)")
    for key, default in WHOLE_EXPERIMENT_FLAGS.items():
        if getattr(args, key) != default:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} cannot be used with --only {args.only} (it belongs to the "
                             "whole experiment)")


def canonical_command(args) -> str:
    """The command line that reproduces this experiment (every flag that was set)."""
    from minituner.cli.trainflags import finetune_defaults

    parts = ["minituner", "experiment", "--out", str(args.out)]
    if args.base:
        parts += ["--base", str(args.base)]
    for key in finetune_defaults():
        value = getattr(args, key, None)
        if value is None or key in ("method", "rank", "model", "threads"):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    parts += ["--lr-grid", args.lr_grid, "--ranks", args.ranks,
              "--qlora-epochs", f"{args.qlora_epochs:g}",
              "--qlora-batch-size", str(args.qlora_batch_size),
              "--repeat-seeds", args.repeat_seeds, "--threads", str(args.threads or 1)]
    if args.variant_seeds != "0,1,2":
        parts += ["--variant-seeds", args.variant_seeds]
    if args.config:
        parts += ["--config", args.config]
    if args.only:
        parts += ["--only", args.only]
    if args.results_json:
        parts += ["--results-json", str(args.results_json)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run everything and print where the report and results went."""
    from minituner.course.experiment import run_experiment
    from minituner.course.sweep import parse_ranks

    check_only(args)
    apply_threads(args)
    cfg = config_from_args(args, method="lora", rank=8)
    command = canonical_command(args)

    def on_run(name: str, results: dict) -> None:
        print(f"{name}: irregular {results['irregular_accuracy_tuned']:.3f}, regular "
              f"{results['regular_accuracy_tuned']:.3f}, control ppl "
              f"{100 * results['control_ppl_change']:+.2f}%, best val loss "
              f"{results['best_val_loss']:.4f}", flush=True)

    if args.only == "variants":
        return run_variants_only(args, cfg, on_run)
    experiment = run_experiment(
        args.out, cfg, base=args.base, lr_grid=_grid(args.lr_grid),
        ranks=parse_ranks(args.ranks), qlora_epochs=args.qlora_epochs,
        qlora_batch_size=args.qlora_batch_size, command=command,
        repeat_seeds=_seeds(args.repeat_seeds),
        variant_seeds=_seeds(args.variant_seeds, "--variant-seeds"),
        progress=Progress("experiment"), on_run=on_run, results_path=args.results_json,
    )
    print(f"experiment done in {experiment['wall_s']:.1f} s (sweep {experiment['sweep_wall_s']:.1f}"
          f" s): report {args.out}/REPORT.md"
          + (f", results {args.results_json}" if args.results_json else ""))
    return 0


def run_variants_only(args, cfg, on_run) -> int:
    """The adapter-variant table alone on ``--base``: runs, variants.json, variants.png and
    REPORT.md in ``--out``; prints the table."""
    from pathlib import Path

    from minituner.course.report import write_report
    from minituner.course.variants import run_variants

    seeds = _seeds(args.variant_seeds, "--variant-seeds")
    if not seeds:
        raise ValueError("--variant-seeds cannot be empty with --only variants")
    summary = run_variants(args.base, args.out, cfg, seeds=seeds, progress=Progress("variants"),
                           on_run=on_run)
    write_report([Path(args.out)], Path(args.out) / "REPORT.md")
    for name in summary["order"]:
        entry = summary["variants"][name]
        print(f"{name:9s} irregular {_shown(entry['irregular_accuracy'])}, regular "
              f"{_shown(entry['regular_accuracy'])}, control ppl change % "
              f"{_shown(entry['control_ppl_change'], 100, '+.2f')}, trainable "
              f"{entry['trainable_params']:,}")
    print(f"variants done in {summary['wall_s']:.1f} s: report {args.out}/REPORT.md")
    return 0


def _shown(stats: dict, scale: float = 1.0, spec: str = ".3f") -> str:
    """'mean +- std' of a variant's metric (the mean alone for one seed)."""
    text = format(scale * stats["mean"], spec)
    return text if stats["std"] is None else f"{text} +- {scale * stats['std']:.3f}"
