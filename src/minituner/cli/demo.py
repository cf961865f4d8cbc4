"""``minituner demo``: the main job, end to end on the built-in data."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    from minituner.cli.pretrain import add_pretrain_flags

    parser = subparsers.add_parser(
        "demo", help="run the whole job: corpus -> pretrain (cached) -> LoRA -> QLoRA -> report",
        description="Build (or reuse) the pretrained base in DIR/base, fine-tune it with LoRA "
                    "r=8 (DIR/lora-r8) and QLoRA r=8 for one epoch (batch 16, 3/4 replay; "
                    "DIR/qlora-r8), evaluate both and write DIR/REPORT.md. "
                    "--steps/--batch-size/--lr/--seed are the base's pretraining settings (the "
                    "seed also seeds fine-tuning).",
    )
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    add_pretrain_flags(parser)
    from minituner.cli.trainflags import add_threads_flag

    add_threads_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the demo and print its headline numbers."""
    import time

    from minituner.cli.finetune import print_headline
    from minituner.cli.pretrain import pretrain_config_from_args, pretrain_with_progress
    from minituner.cli.trainflags import Progress, apply_threads
    from minituner.course.finetune import FinetuneConfig, run_with_progress
    from minituner.course.report import write_report

    started = time.perf_counter()
    apply_threads(args)
    out = Path(args.out)
    cfg = pretrain_config_from_args(args)
    base = pretrain_with_progress(str(out / "base"), cfg, reuse=True)
    state = "reused cached base" if base["reused"] else f"pretrained in {base['wall_s']:.1f} s"
    print(f"base: {state}; validation perplexity {base['val_ppl']:.3f} ({out / 'base'})")
    runs = {
        "lora-r8": FinetuneConfig(method="lora", rank=8, seed=cfg.seed),
        # one epoch, 4 SFT + 12 replay rows per step: the course's bar (control ppl <= +5%)
        "qlora-r8": FinetuneConfig(method="qlora", rank=8, epochs=1.0, batch_size=16,
                                   replay=0.75, seed=cfg.seed),
    }
    results = {}
    for name, run_cfg in runs.items():
        results[name] = run_with_progress(out / "base", out / name, run_cfg, Progress(name),
                                          overwrite=True)
        print(f"{name}: ", end="")
        print_headline(results[name], str(out / name))
        print(f"{name}: harder slices, base -> tuned: {harder_slices(results[name])}")
    diff = results["qlora-r8"]["qlora"]["logit_difference"]
    print(f"qlora-r8: same adapter on the NF4 vs the fp32 base: logits differ by "
          f"{100 * diff['relative']:.2f}% of their mean magnitude")
    report = write_report([out / "base", out / "lora-r8", out / "qlora-r8"], out / "REPORT.md")
    print(f"report: {report} (demo took {time.perf_counter() - started:.1f} s)")
    return 0


HARDER = (("form_choice", "form choice"), ("new_shape_irregular", "new-shape irregular"),
          ("new_shape_regular", "new-shape regular"), ("spanish_irregular", "Spanish irregular"))


def harder_slices(results: dict) -> str:
    """'form choice 0.52 -> 0.63; ...' for the harder probe slices of a run's results."""
    return "; ".join(f"{label} {results[f'{key}_accuracy_base']:.3f} -> "
                     f"{results[f'{key}_accuracy_tuned']:.3f}" for key, label in HARDER)
