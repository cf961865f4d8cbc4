"""The ``hf:DIR`` side of ``finetune`` (``eval``, ``generate`` and ``merge``: cli/runfolders.py).

Not a command of its own: ``finetune`` adds these flags with ``add_hf_finetune_flags`` (a flag
the command already has is left as it is) and hands an ``--model hf:DIR`` invocation to
``run_hf_finetune_command``.
"""

from __future__ import annotations

import argparse
import sys

from minituner.cli.common import positive_float, positive_int


def _add(parser: argparse.ArgumentParser, *flags, **kwargs) -> None:
    """Add a flag unless the parser already has it (the command's own flag wins)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype."""
    _add(parser, "--device", default="auto",
         help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    _add(parser, "--dtype", default=None, choices=("auto", "fp32", "bf16"),
         help="compute dtype; auto (default) = bf16 on CUDA with bf16 support, else fp32 "
              "(CPU bf16 uses AMX where the CPU has it)")


def add_hf_finetune_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``finetune --model hf:DIR`` that the Mini-GPT command does not have."""
    _add(parser, "--model", metavar="hf:DIR",
         help="fine-tune a transformers model directory instead of a Mini-GPT --base")
    _add(parser, "--data", metavar="FILE.jsonl",
         help='hf: training data, {"prompt", "completion"} or {"text"} per line')
    _add(parser, "--val-fraction", type=positive_float, default=None,
         help="hf: hold out this fraction of --data for validation (seeded)")
    _add(parser, "--use-rslora", action="store_true", help="scale by alpha / sqrt(r)")
    _add(parser, "--max-len", type=positive_int, default=None,
         help="hf: tokens per example (default: the model's context); longer ones are cut")
    _add(parser, "--strict-len", action="store_true",
         help="hf: refuse an example longer than --max-len instead of truncating it")
    _add(parser, "--chat-template", action="store_true",
         help="hf: render each prompt with the tokenizer's chat template")
    _add(parser, "--grad-checkpointing", action="store_true",
         help="hf: recompute activations in backward (non-reentrant; less memory)")
    _add(parser, "--quant-scheme", default=None, help="hf QLoRA: NF4 scheme (nf4_per_group_64)")
    add_device_flags(parser)


def hf_finetune_config(args):
    """HFFinetuneConfig from defaults < --config file < explicit flags."""
    from dataclasses import fields

    from minituner.cli.common import load_config_file
    from minituner.hf.finetune import HFFinetuneConfig

    values = load_config_file(getattr(args, "config", None))  # absent keys: class defaults
    for spec in fields(HFFinetuneConfig):
        flag = getattr(args, spec.name, None)
        if flag is not None and flag is not False:  # given (store_true flags default to False)
            values[spec.name] = flag
    values["data"] = values.get("data") or getattr(args, "train_data", None)
    if not values["data"]:
        raise ValueError("--data: give the training JSONL file for an hf: model")
    if isinstance(values.get("targets"), (list, tuple)):
        values["targets"] = ",".join(values["targets"])
    if values.get("epochs") is not None and getattr(args, "steps", None) is None:
        values["steps"] = None
    return HFFinetuneConfig.from_dict(values)


def run_hf_finetune_command(args) -> int:
    """Fine-tune with a progress bar on rank 0; print the settings first and the result last."""
    from minituner.cli.trainflags import Progress
    from minituner.hf.finetune import run_hf_finetune
    from minituner.hf.models import dtype_name
    from minituner.training.distributed import shutdown_distributed

    cfg = hf_finetune_config(args)
    progress = Progress(f"{cfg.method} r={cfg.rank}")
    state = {"main": True}

    def on_start(info: dict) -> None:
        state["main"] = info["dist"].is_main
        if not state["main"]:
            return
        data = info["data"]
        print(f"device {info['device']} (--device {args.device}), dtype "
              f"{dtype_name(info['dtype'])} (--dtype {cfg.dtype}), processes "
              f"{info['dist'].world_size}, global batch {cfg.batch_size}, method {cfg.method} "
              f"r={cfg.rank}, lr {cfg.lr:g}, steps {info['steps']}", flush=True)
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
                                  on_step=on_step, device=args.device, on_start=on_start)
    finally:
        progress.close()
        shutdown_distributed()
    if state["main"]:
        best = results["best_val_loss"]
        print(f"{cfg.method} r={cfg.rank}: {results['steps']} steps in {results['wall_s']:.1f} s"
              f", final loss {results['final_loss']:.4f}"
              + (f", best val loss {best:.4f} at step {results['best_step']}" if best else "")
              + f" -> {args.out}/adapter")
    return 0
