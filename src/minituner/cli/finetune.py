"""``minituner finetune``: LoRA, QLoRA or full fine-tuning of a Mini-GPT base run."""

from __future__ import annotations

from minituner.cli.trainflags import (
    DEFAULT_BASE,
    Progress,
    add_training_flags,
    apply_threads,
    config_from_args,
)


def register(subparsers) -> None:
    """Add the ``finetune`` subcommand."""
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a base run with LoRA, QLoRA or full fine-tuning",
        description="Teach the base the irregular past and participle forms (or your own "
                    "prompt/completion JSONL) and evaluate before and after. Against forgetting: "
                    "--replay (base-corpus rows per batch) and --kl (KL to the frozen base on "
                    "those rows).",
    )
    add_training_flags(parser)
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"pretrained base run folder (default {DEFAULT_BASE}, the demo's)")
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a different run")
    from minituner.cli.hf_commands import add_hf_finetune_flags

    add_hf_finetune_flags(parser)  # --model hf:DIR --data FILE ... (transformers models)
    parser.set_defaults(func=run)


def print_headline(results: dict, out: str) -> None:
    """Base -> tuned accuracies, control perplexity change, trainable parameters."""
    print(
        f"irregular accuracy {results['irregular_accuracy_base']:.3f} -> "
        f"{results['irregular_accuracy_tuned']:.3f}; regular {results['regular_accuracy_base']:.3f}"
        f" -> {results['regular_accuracy_tuned']:.3f}; control perplexity "
        f"{results['control_ppl_base']:.4f} -> {results['control_ppl_tuned']:.4f} "
        f"({100 * results['control_ppl_change']:+.2f}%); trainable parameters "
        f"{results['trainable_params']:,}; {results['wall_s']:.1f} s -> {out}"
    )


def run(args) -> int:
    """Train, evaluate and write the run folder; print the headline numbers."""
    from minituner.course.finetune import run_with_progress

    if getattr(args, "model", None):  # a transformers model: hf:DIR
        from minituner.cli.hf_commands import run_hf_finetune_command

        return run_hf_finetune_command(args)
    apply_threads(args)
    cfg = config_from_args(args)
    progress = Progress(f"{cfg.method} r={cfg.rank}" if cfg.method != "full" else "full")
    results = run_with_progress(args.base, args.out, cfg, progress, resume=args.resume,
                                overwrite=args.overwrite)
    print_headline(results, args.out)
    if "qlora" in results:
        diff = results["qlora"]["logit_difference"]
        print(f"QLoRA vs same adapter on the fp32 base: mean |logit diff| "
              f"{diff['mean_abs']:.4f} = {100 * diff['relative']:.2f}% of mean |logit|")
    return 0
