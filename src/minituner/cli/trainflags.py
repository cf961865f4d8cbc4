"""Flags shared by every fine-tuning command (finetune, sweep, experiment, demo), the progress
bar callback, and one-line argparse errors."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from minituner.cli.common import (
    fraction,
    load_config_file,
    merge_config,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from minituner.training.config import FinetuneConfig

DEFAULT_BASE = "runs/demo/base"


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse usage errors a single line on stderr (exit status 2, no usage dump)."""

    def error(message: str):
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        raise SystemExit(2)

    parser.error = error
    return parser


def finetune_defaults() -> dict:
    """Flag defaults = FinetuneConfig's defaults."""
    from minituner.training.config import FinetuneConfig

    return FinetuneConfig().to_dict()


def add_training_flags(parser: argparse.ArgumentParser, method: bool = True) -> None:
    """--method --rank --alpha --steps/--epochs --batch-size ... --config --out (defaults None:
    unset flags fall back to the config file, then to FinetuneConfig's defaults)."""
    from minituner.training.config import DEFAULT_STEPS

    d = finetune_defaults()
    if method:
        parser.add_argument("--method", default=None, metavar="{lora,qlora,full}",
                            help=f"lora, qlora or full (default {d['method']})")
        parser.add_argument("--rank", type=nonneg_int, default=None,
                            help=f"LoRA rank r (default {d['rank']})")
    parser.add_argument("--alpha", type=positive_float, default=None,
                        help=f"LoRA alpha; scaling = alpha / r (default {d['alpha']:g})")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None,
                        help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=positive_float, default=None,
                        help="passes over the SFT training examples instead of --steps")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"rows per micro-batch, replay rows included "
                             f"(default {d['batch_size']})")
    parser.add_argument("--grad-accum", type=positive_int, default=None,
                        help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"peak learning rate (default {d['lr']:g})")
    parser.add_argument("--warmup", type=fraction, default=None,
                        help=f"warmup fraction of the steps (default {d['warmup']:g})")
    parser.add_argument("--weight-decay", type=nonneg_float, default=None)
    parser.add_argument("--replay", type=fraction, default=None,
                        help=f"fraction of each batch drawn from the base's pretraining lines "
                             f"(default {d['replay']:g}; 0 = none)")
    parser.add_argument("--kl", type=nonneg_float, default=None,
                        help=f"weight of KL(base || tuned) on replay rows (default {d['kl']:g}; "
                             "0 = none)")
    parser.add_argument("--replay-nll", type=nonneg_float, default=None,
                        help="weight of the next-token loss on replay rows (default 1; 0 keeps "
                             "only the KL term there)")
    parser.add_argument("--dropout", type=fraction, default=None, help="LoRA dropout (0)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                        help="module-name suffixes to adapt (default: all 12 Linears)")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help=f"validation every N steps (default {d['eval_every']})")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None,
                        help=f"checkpoint every N steps (default {d['checkpoint_every']})")
    parser.add_argument("--seed", type=nonneg_int, default=None, help="seed (default 0)")
    parser.add_argument("--train-data", metavar="FILE", default=None,
                        help='your own {"prompt", "completion"} JSONL instead of the built-in set')
    parser.add_argument("--val-data", metavar="FILE", default=None,
                        help="validation JSONL for --train-data (default: 10%% of it)")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of these options")
    add_threads_flag(parser)


def config_from_args(args, **overrides) -> FinetuneConfig:
    """FinetuneConfig from defaults < --config file < explicit flags < ``overrides``."""
    from minituner.training.config import FinetuneConfig, check_types

    defaults = finetune_defaults()
    flag_defaults = {key: None for key in defaults}
    config_path = getattr(args, "config", None)
    from_file = load_config_file(config_path)
    merged = merge_config(args, flag_defaults, from_file)
    check_types(from_file, f"config file {config_path}")
    values = {key: (defaults[key] if merged.get(key) is None else merged[key]) for key in defaults}
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):
        if getattr(args, flag, None) is not None:  # a flag beats the config file's other length
            values[other] = None
    values.update(overrides)
    return FinetuneConfig.from_dict(values).validate()


class Progress:
    """A tqdm bar fed by the training loop's ``on_step`` records (loss, val loss, tokens/s).

    ``start(total)`` opens the bar once the run knows its step count; ``close()`` ends it.
    """

    def __init__(self, desc: str):
        self.desc, self.bar, self.tokens = desc, None, 0

    def start(self, total: int) -> None:
        """Open the bar for ``total`` steps."""
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=self.desc, unit="step", dynamic_ncols=True,
                        mininterval=0.5)

    def on_step(self, record: dict) -> None:
        """Advance one step and show loss, validation loss and target tokens per second."""
        if self.bar is None:
            self.start(record["step"])
        if self.bar.n == 0 and record["step"] > 1:  # resumed: start where the run is
            self.bar.update(record["step"] - 1)
        self.bar.update(1)
        self.tokens += record["target_tokens"]
        shown = {"loss": f"{record['loss']:.3f}",
                 "tok/s": f"{self.tokens / max(record['elapsed_s'], 1e-9):.0f}"}
        if "val_loss" in record:
            shown["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads: torch CPU threads (Mini-GPT is tiny: one thread is fastest, above all on a
    busy machine, where extra threads mostly wait for each other)."""
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1)")


def apply_threads(args) -> None:
    """Set torch's intra-op thread count from --threads (default 1)."""
    import torch

    torch.set_num_threads(getattr(args, "threads", None) or 1)
