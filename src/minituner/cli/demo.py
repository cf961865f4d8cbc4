"""``minituner demo``: the main job, end to end on the built-in data."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    from minituner.cli.pretrain import add_pretrain_flags

    parser = subparsers.add_parser(
        "demo", help="run the whole job: corpus -> pretrain (cached) -> ...",
        description="Build (or reuse) the pretrained base, then run the experiment.",
    )
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    add_pretrain_flags(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the demo and print its headline numbers."""
    from minituner.cli.pretrain import pretrain_config_from_args, pretrain_with_progress

    out = Path(args.out)
    cfg = pretrain_config_from_args(args)
    base = pretrain_with_progress(str(out / "base"), cfg, reuse=True)
    state = "reused cached base" if base["reused"] else f"pretrained in {base['wall_s']:.1f} s"
    print(f"base: {state}; validation perplexity {base['val_ppl']:.3f} ({out / 'base'})")
    return 0
