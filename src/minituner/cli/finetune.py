"""``minituner finetune``: LoRA, QLoRA or full fine-tuning of a Mini-GPT base run, or LoRA and
QLoRA of a transformers model (``--model hf:DIR``), with one set of flags for both."""

from __future__ import annotations

import sys

from minituner.cli.runfolders import one_line_warnings
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
        "finetune", help="fine-tune a Mini-GPT base run or a transformers model (hf:DIR)",
        description="Mini-GPT (--base RUN): teach the base the irregular past and participle "
                    "forms (or your own prompt/completion JSONL) and evaluate before and after; "
                    "against forgetting: --replay (base-corpus rows per batch) and --kl (KL to "
                    "the frozen base on those rows). Transformers (--model hf:DIR --data FILE): "
                    "LoRA or QLoRA on your JSONL. Defaults differ per model kind; --help shows "
                    "both.",
    )
    add_training_flags(parser, model_flags=True)
    parser.add_argument("--base", default=None,
                        help=f"Mini-GPT base run folder (default {DEFAULT_BASE}, the demo's)")
    parser.add_argument("--out", default=None, help="run folder to write (required unless --plan)")
    parser.add_argument("--plan", action="store_true",
                        help="hf: models: print the preflight plan (steps, tokens, padding with "
                             "and without --packing, predicted peak memory by bucket, a "
                             "--threads warning) from these flags and the data; train nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a different run")
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
    cfg = config_from_args(args)
    if cfg.model is None:
        cfg = cfg.replace(model=DEFAULT_BASE)
    if args.plan:
        return run_plan(args, cfg)
    if args.out is None:
        raise ValueError("--out: give the run folder to write (or --plan to train nothing)")
    if not cfg.verify_base and not args.resume:
        raise ValueError("--no-verify-base needs --resume (it lets a resume go on over a base "
                         "whose fingerprint changed)")
    apply_threads(cfg.threads)
    with one_line_warnings():  # e.g. a damaged checkpoint --resume skipped
        if cfg.kind == "hf":
            return run_hf(args, cfg)
        return run_minigpt(args, cfg)


def run_plan(args, cfg) -> int:
    """Print the preflight plan of an hf: run; nothing is trained or written."""
    if cfg.kind != "hf":
        raise ValueError("--plan applies to transformers (hf:) models only")
    if args.resume or args.overwrite:
        raise ValueError("--plan trains nothing: leave out --resume and --overwrite")
    from minituner.hf.plan import plan_finetune, plan_text

    plan = plan_finetune(cfg, args.device or "auto")
    for line in plan_text(plan):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return 0


def resume_line(info: dict) -> str | None:
    """"resuming from step N of M" for a resumed run, else None."""
    if info.get("resumed_from") is None:
        return None
    return f"resuming from step {info['resumed_from']} of {info['steps']}"


def sizes_line(info: dict) -> str:
    """What the run is about to do: trainable parameters, examples, tokens, epochs, steps,
    effective batch."""
    return (f"trainable parameters {info['trainable_params']:,}, examples {info['examples']:,}, "
            f"tokens {info['tokens']:,}, epochs {info['epochs']:.2f}, steps {info['steps']}, "
            f"effective batch {info['effective_batch']}")


def print_complete(results: dict, out: str) -> None:
    """What --resume of a finished run says (it trains nothing)."""
    print(f"{out}: the run is complete ({results.get('steps')} steps); nothing to resume "
          "(--overwrite starts over)")


def unk_warning(unk: dict | None) -> str | None:
    """One line on the user's examples that map to <unk> in part, or None when none do."""
    if not unk or not unk.get("examples"):
        return None
    return (f"warning: {unk['examples']} of {unk['total_examples']} example(s) hold characters "
            f"the Mini-GPT tokenizer cannot spell ({unk['characters']} character(s) map to "
            f"<unk>: {''.join(unk['shown'])!r}; first at {unk['first_source']})")


def run_minigpt(args, cfg) -> int:
    """Fine-tune a Mini-GPT base run and print its headline numbers."""
    from minituner.course.finetune import run_finetune

    progress = Progress(f"{cfg.method} r={cfg.rank}" if cfg.method != "full" else "full")

    def on_start(info: dict) -> None:
        print(sizes_line(info), flush=True)
        line = resume_line(info)
        if line:
            print(line, flush=True)
        warning = unk_warning(info.get("unk"))
        if warning:
            print(warning, file=sys.stderr, flush=True)
        progress.start(info["steps"])

    try:
        results = run_finetune(cfg.model, args.out, cfg, resume=args.resume,
                               overwrite=args.overwrite, on_start=on_start,
                               on_step=progress.on_step)
    finally:
        progress.close()
    if results.get("already_complete"):
        print_complete(results, args.out)
        return 0
    print_headline(results, args.out)
    if "qlora" in results:
        diff = results["qlora"]["logit_difference"]
        print(f"QLoRA vs same adapter on the fp32 base: mean |logit diff| "
              f"{diff['mean_abs']:.4f} = {100 * diff['relative']:.2f}% of mean |logit|")
    return 0


def run_hf(args, cfg) -> int:
    """Fine-tune a transformers model with a progress bar on rank 0; print the settings first
    and the result last."""
    from minituner.hf.finetune import run_hf_finetune
    from minituner.hf.models import dtype_name, resolve_device
    from minituner.training.distributed import shutdown_distributed
    from minituner.util.files import pin_mmap_threshold

    if not cfg.train_data:
        raise ValueError("--data: give the training JSONL file for an hf: model")
    device = args.device or "auto"
    if resolve_device(device).type == "cpu":  # freed activations leave the heap at once
        pin_mmap_threshold()
    progress = Progress(f"{cfg.method} r={cfg.rank}")
    state = {"main": True}

    def on_start(info: dict) -> None:
        state["main"] = info["dist"].is_main
        if not state["main"]:
            return
        data = info["data"]
        print(f"device {info['device']} (--device {device}), dtype "
              f"{dtype_name(info['dtype'])} (--dtype {cfg.dtype}), processes "
              f"{info['dist'].world_size}, global batch {cfg.batch_size}, method {cfg.method} "
              f"r={cfg.rank}, lr {cfg.lr:g}, steps {info['steps']}", flush=True)
        print(sizes_line(info), flush=True)
        line = resume_line(info)
        if line:
            print(line, flush=True)
        if data.train.truncated:
            lines = data.train.truncated
            print(f"warning: {len(lines)} training example(s) longer than {data.max_len} tokens "
                  f"were truncated (lines {lines[:5]}{' ...' if len(lines) > 5 else ''}); "
                  "--strict-len refuses them instead", file=sys.stderr, flush=True)
        if data.train.dropped:
            print(f"warning: {len(data.train.dropped)} example(s) kept no completion token "
                  "after truncation and were dropped", file=sys.stderr, flush=True)
        progress.start(info["steps"])

    def on_step(record: dict) -> None:
        if state["main"]:
            progress.on_step(record)

    try:
        results = run_hf_finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                                  on_step=on_step, device=device, on_start=on_start)
    finally:
        progress.close()
        shutdown_distributed()
    if results.get("already_complete"):
        print_complete(results, args.out)
        return 0
    if state["main"]:
        best = results["best_val_loss"]
        print(f"{cfg.method} r={cfg.rank}: {results['steps']} steps in {results['wall_s']:.1f} s"
              f", final loss {results['final_loss']:.4f}"
              + (f", best val loss {best:.4f} at step {results['best_step']}" if best else "")
              + f" -> {args.out}/adapter")
    return 0
