"""Flags shared by every fine-tuning command (finetune, sweep, experiment, demo), the progress
bar callback, and one-line argparse errors."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from minituner.cli.common import (
    fraction,
    load_config_file,
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


def finetune_defaults(kind: str = "minigpt") -> dict:
    """Flag defaults of a model kind ('minigpt' or 'hf'): FinetuneConfig's defaults for it."""
    from minituner.training.config import kind_defaults

    return kind_defaults(kind)


def _default(name: str, kinds: tuple, fmt: str = "") -> str:
    """'(default 600; hf: models 100)': the default of each kind that may use the setting."""
    values = {kind: format(finetune_defaults(kind)[name], fmt) for kind in kinds}
    if len(set(values.values())) == 1:
        return f"(default {next(iter(values.values()))})"
    return f"(default {values['minigpt']}; hf: models {values['hf']})"


def add_training_flags(parser: argparse.ArgumentParser, method: bool = True,
                       model_flags: bool = False) -> None:
    """--method --rank --alpha --steps/--epochs --batch-size ... --config (defaults None: unset
    flags fall back to the config file, then to the model kind's defaults). ``model_flags``
    adds --model and the transformers settings (``finetune``)."""
    kinds = ("minigpt", "hf") if model_flags else ("minigpt",)
    hf_only = "hf: models only. "

    def default(name: str, fmt: str = "") -> str:
        return _default(name, kinds, fmt)

    if model_flags:
        parser.add_argument("--model", default=None, metavar="RUN|hf:DIR",
                            help="the base to fine-tune: a Mini-GPT run folder (like --base) or "
                                 "hf:DIR, a transformers model directory")
    if method:
        parser.add_argument("--method", default=None, metavar="{lora,qlora,dora,qdora,full}",
                            help="lora, qlora (NF4 base), dora (DoRA), qdora (DoRA on an NF4 "
                                 "base) or full (Mini-GPT only) (default lora)")
        parser.add_argument("--rank", type=nonneg_int, default=None,
                            help=f"LoRA rank r {default('rank')}")
    parser.add_argument("--alpha", type=positive_float, default=None,
                        help=f"LoRA alpha; scaling = alpha / r {default('alpha', 'g')}")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None,
                        help=f"optimizer steps {default('steps')}")
    length.add_argument("--epochs", type=positive_float, default=None,
                        help="passes over the training examples instead of --steps")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"rows per micro-batch, replay rows included "
                             f"{default('batch_size')}")
    parser.add_argument("--grad-accum", type=positive_int, default=None,
                        help=f"micro-batches per optimizer step {default('grad_accum')}")
    parser.add_argument("--lr", "--learning-rate", type=positive_float, default=None, dest="lr",
                        help=f"peak learning rate {default('lr', 'g')}")
    parser.add_argument("--lr-scheduler", default=None, choices=("cosine", "linear", "constant"),
                        help="after warmup: cosine (default, down to 10%% of --lr), linear "
                             "(down to 0) or constant")
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-ratio", "--warmup", type=fraction, default=None, dest="warmup",
                        help=f"warmup fraction of the steps {default('warmup', 'g')}")
    warmup.add_argument("--warmup-steps", type=nonneg_int, default=None,
                        help="warmup in optimizer steps instead of --warmup-ratio")
    parser.add_argument("--weight-decay", type=nonneg_float, default=None,
                        help=f"AdamW weight decay {default('weight_decay', 'g')}")
    mg_only = "Mini-GPT only. " if model_flags else ""
    parser.add_argument("--replay", type=fraction, default=None,
                        help=f"{mg_only}fraction of each batch drawn from the base's pretraining "
                             f"lines (default {finetune_defaults()['replay']:g}; 0 = none)")
    parser.add_argument("--kl", type=nonneg_float, default=None,
                        help=f"{mg_only}weight of KL(base || tuned) on replay rows (default "
                             f"{finetune_defaults()['kl']:g}; 0 = none)")
    parser.add_argument("--replay-nll", type=nonneg_float, default=None,
                        help=f"{mg_only}weight of the next-token loss on replay rows (default 1; "
                             "0 keeps only the KL term there)")
    parser.add_argument("--dropout", type=fraction, default=None,
                        help=f"LoRA dropout {default('dropout', 'g')}")
    parser.add_argument("--init", default=None, metavar="NAME",
                        help="adapter start: gaussian, gaussian_std or kaiming (A random, B = 0; "
                             "default gaussian, hf: models kaiming), pissa (top singular "
                             "vectors, LoRA) or loftq[:ITERS] (QLoRA, Mini-GPT; default 1 "
                             "iteration); pissa and loftq save a plain rank-2r adapter for the "
                             "original base")
    parser.add_argument("--loraplus-lr-ratio", type=positive_float, default=None, metavar="K",
                        help="LoRA+: lora_B learns at K times the learning rate of lora_A "
                             "(the paper suggests 16; default: plain LoRA)")
    parser.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                        help="module-name suffixes to adapt, or one regex matched against the "
                             "whole module path (PEFT's target_modules string) (default: every "
                             "Linear)")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help=f"validation every N steps {default('eval_every')}")
    parser.add_argument("--checkpoint-every", type=positive_int, default=None,
                        help=f"checkpoint every N steps {default('checkpoint_every')}")
    parser.add_argument("--seed", type=nonneg_int, default=None, help="seed (default 0)")
    parser.add_argument("--train-data", *(["--data"] if model_flags else []), metavar="FILE",
                        default=None, dest="train_data",
                        help='your own {"prompt", "completion"} JSONL instead of the built-in set'
                             + (' (hf: models: required; {"text"} lines too)' if model_flags
                                else ""))
    parser.add_argument("--val-data", metavar="FILE", default=None,
                        help="validation JSONL for --train-data (Mini-GPT default: 10%% of it"
                             + ("; hf: models: --val-fraction, or none)" if model_flags else ")"))
    parser.add_argument("--allow-unk", action="store_true", default=None,
                        help=f"{mg_only}train on completions that are mostly <unk> (characters "
                             "the 64-token tokenizer cannot spell: upper case, emoji, CJK ...)")
    parser.add_argument("--quant-scheme", default=None,
                        help=f"QLoRA: NF4 scheme {default('quant_scheme')}")
    if model_flags:
        parser.add_argument("--val-fraction", type=positive_float, default=None,
                            help=f"{hf_only}hold out this fraction of --data for validation")
        parser.add_argument("--use-rslora", action="store_true", default=None,
                            help=f"{hf_only}scale by alpha / sqrt(r)")
        parser.add_argument("--max-len", type=positive_int, default=None,
                            help=f"{hf_only}tokens per example (default: the model's context); "
                                 "longer ones are cut")
        parser.add_argument("--strict-len", action="store_true", default=None,
                            help=f"{hf_only}refuse an example longer than --max-len instead of "
                                 "truncating it")
        parser.add_argument("--chat-template", action="store_true", default=None,
                            help=f"{hf_only}render each prompt with the tokenizer's chat template")
        parser.add_argument("--packing", action="store_true", default=None,
                            help=f"{hf_only}pack several examples into each --max-len row, "
                                 "each attending only to itself (per-example positions, "
                                 "block-diagonal mask); --batch-size counts packed rows")
        parser.add_argument("--fsdp", action="store_true", default=None,
                            help=f"{hf_only}under torchrun: shard the blocks, NF4 weights, "
                                 "adapters and AdamW state over the processes (FSDP2) "
                                 "instead of DDP")
        parser.add_argument("--grad-checkpointing", action="store_true", default=None,
                            help=f"{hf_only}recompute activations in backward (less memory)")
        parser.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16"),
                            help=f"{hf_only}compute dtype; auto (default) = bf16 on CUDA with "
                                 "bf16 support, else fp32")
        parser.add_argument("--allow-pickle", action="store_true", default=None,
                            help=f"{hf_only}read a base folder that holds only pickle weights "
                                 "(pytorch_model.bin; unpickling can run code)")
        parser.add_argument("--exclude", nargs="+", default=None, metavar="NAME",
                            help=f"{hf_only}module-name suffixes (or one regex) never adapted")
        parser.add_argument("--layers", default=None, metavar="RANGE",
                            help=f"{hf_only}adapt these decoder layers only: 0-11 or 0,2,5 "
                                 "(PEFT's layers_to_transform)")
        parser.add_argument("--modules-to-save", nargs="+", default=None, metavar="NAME",
                            help=f"{hf_only}modules trained in full beside the adapters and "
                                 "saved with them (e.g. embed_tokens lm_head)")
        parser.add_argument("--add-tokens", nargs="+", default=None, metavar="TOK",
                            help=f"{hf_only}add these special tokens to the tokenizer (data may "
                                 "use them); the embeddings and head grow, train in full and "
                                 "are saved with the tokenizer")
        parser.add_argument("--device", default=None,
                            help=f"{hf_only}auto (default: CUDA when available), cpu, cuda or "
                                 "cuda:N")
    if model_flags:
        parser.add_argument("--no-verify-base", dest="verify_base", action="store_false",
                            default=None,
                            help="with --resume: go on although the base's fingerprint differs "
                                 "from the one the run recorded (a warning says so)")
    parser.add_argument("--report-to", nargs="+", default=None,
                        choices=("tensorboard", "wandb", "mlflow"),
                        help="also log to TensorBoard (event files in the run folder), or W&B / "
                             "MLflow offline when installed")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of these settings (flags given here win)")
    add_threads_flag(parser)


CONFIG_ALIASES = {"data": "train_data", "base": "model"}


def config_file_values(path: str | None) -> dict:
    """The settings of a --config file, type-checked (``data`` and ``base`` name
    ``train_data`` and ``model``)."""
    from minituner.training.config import FinetuneConfig
    from minituner.util.config import typed_values

    values = load_config_file(path)
    values = {CONFIG_ALIASES.get(key, key): value for key, value in values.items()}
    return typed_values(FinetuneConfig, values, f"config file {path}")


def flag_values(args) -> dict:
    """The FinetuneConfig settings given as flags (a flag left unset is None)."""
    from minituner.training.config import FIELD_DEFAULTS

    return {key: getattr(args, key) for key in FIELD_DEFAULTS
            if getattr(args, key, None) is not None}


def config_from_args(args, **overrides) -> FinetuneConfig:
    """FinetuneConfig from the model kind's defaults < --config file < explicit flags <
    ``overrides``, validated (a setting the kind cannot use is refused by name)."""
    from minituner.training.config import FinetuneConfig, check_given_settings, model_kind
    from minituner.util.config import merge_settings

    from_file = config_file_values(getattr(args, "config", None))
    flags = flag_values(args)
    base = getattr(args, "base", None)
    if base is not None:
        if flags.get("model") is not None:
            raise ValueError("--base: give --model or --base, not both")
        flags["model"] = base
    kind = model_kind(flags.get("model", from_file.get("model")))
    if kind != "hf" and getattr(args, "device", None) is not None:
        raise ValueError("--device cannot be used with Mini-GPT models (they train on the CPU)")
    values = merge_settings(finetune_defaults(kind), from_file, flags,
                            exclusive=[("steps", "epochs")])
    values.update(overrides)
    check_finite(values)
    cfg = FinetuneConfig.from_dict(values).validate()
    check_given_settings({**from_file, **flags}, cfg.method)
    check_rank_fits(cfg)
    return cfg


def check_finite(values: dict) -> None:
    """Refuse an inf or nan setting (a --config file can spell them: .inf, .nan) by its flag."""
    from minituner.training.config import flag_name

    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_name(name)} must be a finite number, got {value}")


HF_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def model_width(model: str | None) -> int | None:
    """The hidden width of a Mini-GPT base run or an hf:DIR model, read from its config.json
    (None when there is none to read: the loader reports that later)."""
    from minituner.training.config import HF_PREFIX

    model = model or DEFAULT_BASE
    hf = model.startswith(HF_PREFIX)
    path = Path(model[len(HF_PREFIX):] if hf else model) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    section = config if hf else config.get("model") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        return None
    for key in HF_WIDTH_KEYS if hf else ("d_model",):
        if isinstance(section.get(key), int) and section[key] > 0:
            return section[key]
    return None


def check_rank_fits(cfg: FinetuneConfig) -> None:
    """Refuse a LoRA rank above the model's width before any memory is allocated: B @ A has
    rank at most the width, so a larger r only costs memory (r = 10**9 asks for terabytes)."""
    if cfg.method == "full":
        return
    width = model_width(cfg.model)
    if width is not None and cfg.rank > width:
        raise ValueError(f"--rank {cfg.rank} is larger than the model's width {width} "
                         f"(a LoRA update has rank at most {width})")


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
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default 1)")


def apply_threads(args_or_threads) -> None:
    """Set torch's intra-op thread count from --threads (default 1), or from a thread count."""
    import torch

    threads = args_or_threads
    if not isinstance(threads, int) or isinstance(threads, bool):
        threads = getattr(args_or_threads, "threads", None) or 1
    torch.set_num_threads(threads)
