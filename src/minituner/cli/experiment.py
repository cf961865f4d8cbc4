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
    parser.add_argument("--results-json", default=None, metavar="PATH",
                        help="also write the quiz's results file here "
                             "(docs/results/phase-28.json)")
    parser.set_defaults(func=run)


def _seeds(text: str) -> list:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--repeat-seeds must be comma-separated integers, got {text!r}") from None


def _grid(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--lr-grid must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--lr-grid must hold positive learning rates, got {text!r}")
    return values


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
    if args.config:
        parts += ["--config", args.config]
    if args.results_json:
        parts += ["--results-json", str(args.results_json)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run everything and print where the report and results went."""
    from minituner.course.experiment import run_experiment
    from minituner.course.sweep import parse_ranks

    apply_threads(args)
    cfg = config_from_args(args, method="lora", rank=8)
    command = canonical_command(args)

    def on_run(name: str, results: dict) -> None:
        print(f"{name}: irregular {results['irregular_accuracy_tuned']:.3f}, regular "
              f"{results['regular_accuracy_tuned']:.3f}, control ppl "
              f"{100 * results['control_ppl_change']:+.2f}%, best val loss "
              f"{results['best_val_loss']:.4f}", flush=True)

    experiment = run_experiment(
        args.out, cfg, base=args.base, lr_grid=_grid(args.lr_grid),
        ranks=parse_ranks(args.ranks), qlora_epochs=args.qlora_epochs,
        qlora_batch_size=args.qlora_batch_size, command=command,
        repeat_seeds=_seeds(args.repeat_seeds),
        progress=Progress("experiment"), on_run=on_run, results_path=args.results_json,
    )
    print(f"experiment done in {experiment['wall_s']:.1f} s (sweep {experiment['sweep_wall_s']:.1f}"
          f" s): report {args.out}/REPORT.md"
          + (f", results {args.results_json}" if args.results_json else ""))
    return 0
