"""``minituner pretrain``: build the Mini-GPT base model on the verb corpus."""

from __future__ import annotations

import argparse

from minituner.cli.common import load_config_file, nonneg_int, positive_float, positive_int
from minituner.cli.runfolders import one_line_warnings

DEFAULTS = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "seed": 0}


def add_pretrain_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``pretrain`` and ``demo``."""
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"pretraining steps (default {DEFAULTS['steps']})")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"rows per batch (default {DEFAULTS['batch_size']})")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"peak learning rate (default {DEFAULTS['lr']:g})")
    parser.add_argument("--seed", type=nonneg_int, default=None,
                        help=f"seed (default {DEFAULTS['seed']})")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of pretraining settings (flags given here win)")


def register(subparsers) -> None:
    """Add the ``pretrain`` subcommand."""
    parser = subparsers.add_parser(
        "pretrain", help="pretrain Mini-GPT on the verb corpus",
        description="Generate the corpus, train the tokenizer and pretrain Mini-GPT.",
    )
    add_pretrain_flags(parser)
    parser.add_argument("--out", default="runs/base", help="run folder (default runs/base)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different or unfinished run")
    parser.set_defaults(func=run)


def pretrain_config_from_args(args) -> object:
    """PretrainConfig from defaults < --config file < explicit flags."""
    from minituner.training.config import PretrainConfig
    from minituner.util.config import from_dict, merge_settings, typed_values

    from_file = typed_values(PretrainConfig, load_config_file(args.config),
                             f"config file {args.config}")
    flags = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None}
    merged = merge_settings(DEFAULTS, from_file, flags)
    return from_dict(PretrainConfig, merged, "pretrain config")


def pretrain_with_progress(out: str, cfg, overwrite: bool = False, reuse: bool = False,
                           resume: bool = False) -> dict:
    """Run pretraining with a tqdm progress bar showing the loss; the bar starts with the first
    step trained (a resumed run's at its checkpoint, a refused run shows none)."""
    from tqdm import tqdm

    from minituner.course.pretraining import run_pretraining

    bars = []

    def on_step(record: dict) -> None:
        if not bars:
            bars.append(tqdm(total=cfg.steps, initial=record["step"] - 1, desc="pretrain",
                             unit="step", dynamic_ncols=True, mininterval=0.5))
        bar = bars[0]
        bar.update(record["step"] - bar.n)
        shown = {"loss": f"{record['loss']:.3f}"}
        if "val_ppl" in record:
            shown["val_ppl"] = f"{record['val_ppl']:.3f}"
        bar.set_postfix(shown, refresh=False)

    def on_start(info: dict) -> None:
        if info["resumed_from"] is not None:
            print(f"resuming from step {info['resumed_from']} of {info['steps']}", flush=True)

    try:
        return run_pretraining(out, cfg, overwrite=overwrite, reuse=reuse, on_step=on_step,
                               resume=resume, on_start=on_start)
    finally:
        for bar in bars:
            bar.close()


def run(args) -> int:
    """Pretrain and print the validation perplexity and wall time."""
    cfg = pretrain_config_from_args(args)
    with one_line_warnings():  # e.g. a damaged checkpoint --resume skipped
        results = pretrain_with_progress(args.out, cfg, overwrite=args.overwrite,
                                         resume=args.resume)
    if args.resume and results.get("already_complete"):
        print(f"{args.out}: the run is complete ({results['steps']} steps); nothing to resume "
              "(--overwrite starts over)")
        return 0
    print(
        f"pretrained {results['params']:,} parameters in {results['wall_s']:.1f} s: "
        f"validation perplexity {results['val_ppl']:.3f}, test {results['test_ppl']:.3f} "
        f"-> {args.out}"
    )
    return 0
