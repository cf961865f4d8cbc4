"""``minituner sweep``: LoRA at several ranks on the same data, steps and seed."""

from __future__ import annotations

from minituner.cli.trainflags import (
    DEFAULT_BASE,
    Progress,
    add_training_flags,
    apply_threads,
    config_from_args,
)


def register(subparsers) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep", help="rank sweep: accuracy and control perplexity against r",
        description="Fine-tune one LoRA run per rank (rank 0 = the untouched base) with the same "
                    "data, steps and seed; write sweep.json, sweep.png and one run folder per "
                    "rank; report the elbow (smallest r within 1 point of the best accuracy).",
    )
    parser.add_argument("--ranks", default="0,2,4,8,16,32",
                        help="comma-separated ranks (default 0,2,4,8,16,32)")
    parser.add_argument("--method", default=None, metavar="{lora,qlora}",
                        help="lora (default) or qlora")
    add_training_flags(parser, method=False)
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"base run (default {DEFAULT_BASE})")
    parser.add_argument("--out", required=True, help="sweep folder to write")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the sweep, printing one line per rank and the elbow."""
    from minituner.course.sweep import parse_ranks, run_sweep

    apply_threads(args)
    ranks = parse_ranks(args.ranks)
    method = args.method or "lora"
    if method not in ("lora", "qlora"):
        raise ValueError(f"--method must be lora or qlora for a sweep, got {method!r}")
    cfg = config_from_args(args, method=method)

    def on_run(rank: int, point: dict) -> None:
        print(f"r={rank:<3} trainable {point['trainable_params']:>7,}  irregular "
              f"{point['irregular_accuracy']:.3f}  regular {point['regular_accuracy']:.3f}  "
              f"control ppl {point['control_ppl']:.4f}", flush=True)

    summary = run_sweep(args.base, args.out, ranks, cfg, on_run=on_run,
                        progress=Progress("sweep"))
    print(f"elbow r = {summary['elbow_rank']} ({summary['elbow_rule']}); "
          f"{summary['wall_s']:.1f} s -> {args.out}/sweep.json, {args.out}/sweep.png")
    return 0
