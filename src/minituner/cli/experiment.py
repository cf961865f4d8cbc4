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
    parser.add_argument("--qlora-batch-size", type=positive_int, default=16,
                        help="batch size of the QLoRA runs (default 16, with --qlora-replay "
                             "0.75: 4 SFT rows per step, 192 updates in its one epoch)")
    parser.add_argument("--qlora-replay", type=float, default=0.75,
                        help="replay fraction of the QLoRA runs (default 0.75)")
    parser.add_argument("--repeat-seeds", default="1,2,3,4",
                        help="other seeds of the r=8 LoRA, full FT, QLoRA and sweep runs "
                             "(default 1,2,3,4: 5 seeds with --seed; '' for none)")
    parser.add_argument("--ablation-seeds", default=None,
                        help="seeds of the anti-forgetting ablation (default 0; --full 0,1,2)")
    parser.add_argument("--method-seeds", default="0,1,2",
                        help="seeds of the method variants for the goals (default 0,1,2)")
    parser.add_argument("--framecv-seeds", default=None,
                        help="seeds of each frame cross-validation fold (default 0; --full "
                             "0,1,2; '' for none)")
    parser.add_argument("--variant-seeds", default=None,
                        help="seeds of the adapter-variant table (default none; --full 0,1,2)")
    parser.add_argument("--full", action="store_true",
                        help="also what does not fit the default's 30 minutes: the ablation "
                             "and frame cross-validation with 3 seeds, the adapter-variant "
                             "table (LoRA, DoRA, PiSSA, LoRA+, QLoRA, LoftQ; 3 seeds)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="worker processes for the runs (default 2; results do not depend "
                             "on it)")
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
                          "qlora_epochs": 1.0, "qlora_batch_size": 16, "qlora_replay": 0.75,
                          "repeat_seeds": "1,2,3,4", "ablation_seeds": None,
                          "method_seeds": "0,1,2", "framecv_seeds": None, "full": False,
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
              "--qlora-replay", f"{args.qlora_replay:g}",
              "--repeat-seeds", args.repeat_seeds, "--threads", str(args.threads or 1)]
    for key in ("ablation_seeds", "method_seeds", "framecv_seeds", "variant_seeds"):
        if getattr(args, key) is not None and getattr(args, key) != WHOLE_DEFAULTS.get(key):
            parts += ["--" + key.replace("_", "-"), getattr(args, key)]
    if args.full:
        parts.append("--full")
    parts += ["--workers", str(args.workers)]
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
        if args.variant_seeds is None:
            args.variant_seeds = "0,1,2"
        return run_variants_only(args, cfg, on_run)
    if not 0 <= args.qlora_replay < 1:
        raise ValueError(f"--qlora-replay must be a fraction in [0, 1), got {args.qlora_replay}")
    seeds = {key: _seeds(_seed_text(args, key), "--" + key.replace("_", "-"))
             for key in ("ablation_seeds", "method_seeds", "framecv_seeds", "variant_seeds")}
    for key in ("ablation_seeds", "method_seeds"):
        if not seeds[key]:
            raise ValueError(f"--{key.replace('_', '-')} cannot be empty")
    experiment = run_experiment(
        args.out, cfg, base=args.base, lr_grid=_grid(args.lr_grid),
        ranks=parse_ranks(args.ranks), qlora_epochs=args.qlora_epochs,
        qlora_setting={"batch_size": args.qlora_batch_size, "replay": args.qlora_replay},
        command=command, repeat_seeds=_seeds(args.repeat_seeds), **seeds,
        workers=args.workers,
        progress=Progress("experiment") if args.workers == 1 else RunsProgress("experiment"),
        on_run=on_run, results_path=args.results_json,
    )
    print(f"experiment done in {experiment['wall_s']:.1f} s on {args.workers} worker(s) (runs "
          f"after the lr search {experiment['runs_wall_s']:.1f} s): report "
          f"{args.out}/REPORT.md" + (f", results {args.results_json}" if args.results_json
                                     else ""))
    return 0


WHOLE_DEFAULTS = {"ablation_seeds": "0", "method_seeds": "0,1,2", "framecv_seeds": "0",
                  "variant_seeds": ""}
FULL_DEFAULTS = {"ablation_seeds": "0,1,2", "framecv_seeds": "0,1,2", "variant_seeds": "0,1,2"}


def _seed_text(args, key: str) -> str:
    """A seed flag's text: as given, else its --full or default value."""
    value = getattr(args, key)
    if value is not None:
        return value
    return (FULL_DEFAULTS if args.full else WHOLE_DEFAULTS).get(key, WHOLE_DEFAULTS[key])


class RunsProgress:
    """A tqdm bar counting finished runs (worker processes report runs, not steps)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def start(self, total: int) -> None:
        """Open the bar for ``total`` runs."""
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=self.desc, unit="run", dynamic_ncols=True)

    def on_step(self, record: dict) -> None:
        """One more run finished."""
        self.bar.update(1)

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
