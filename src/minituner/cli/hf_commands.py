"""The ``hf:DIR`` side of ``merge``, ``eval`` and ``generate`` (``finetune`` has one set of flags
for every model kind: :mod:`minituner.cli.finetune`).

Not a command of its own: the Mini-GPT commands add these flags with ``add_hf_*_flags`` (a flag
the command already has is left as it is) and hand an ``--model hf:DIR`` invocation to the
``run_hf_*`` handlers here.
"""

from __future__ import annotations

import argparse

from minituner.cli.common import nonneg_int


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


def add_hf_merge_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``merge --model hf:DIR --adapter DIR --out DIR``."""
    _add(parser, "--model", metavar="hf:DIR", help="transformers base (default: the adapter's)")
    _add(parser, "--adapter", metavar="DIR", help="adapter directory (PEFT layout)")
    _add(parser, "--out", metavar="DIR", help="output transformers directory")
    _add(parser, "--target", choices=("dequantized", "requantized"), default=None,
         help="dequantized: float weights (default); requantized: NF4, bitsandbytes layout")
    _add(parser, "--overwrite", action="store_true")
    _add(parser, "--device", default="cpu", help="cpu (default) or cuda")


def run_hf_merge_command(args) -> int:
    """Merge and print the report's numbers."""
    from minituner.hf.merge import merge_hf_adapter
    from minituner.hf.models import resolve_device

    if not args.adapter or not args.out:
        raise ValueError("merge of an hf: model needs --adapter DIR and --out DIR")
    report = merge_hf_adapter(args.model, args.adapter, args.out, target=args.target,
                              device=resolve_device(args.device), overwrite=args.overwrite)
    memory, reloaded = report["merged_in_memory"], report["reloaded_from_directory"]
    print(f"merged {report['n_layers']} layers ({report['target']}) -> {args.out}; max |logit "
          f"diff| vs the unmerged adapter: {memory['max_abs_diff']:.3g} in memory, "
          f"{reloaded['max_abs_diff']:.3g} after reloading (report: {args.out}/merge_report.json)")
    return 0


def load_hf_for_inference(args):
    """(ModelView, TokenizerView) of --model hf:DIR, with --adapter applied when given."""
    from minituner.hf.load import load_base
    from minituner.hf.merge import adapter_base_record
    from minituner.hf.models import load_hf_tokenizer, resolve_device
    from minituner.hf.views import hf_views

    device = resolve_device(getattr(args, "device", "cpu") or "cpu")
    adapter = getattr(args, "adapter", None)
    if adapter:
        from minituner.lora.adapters import load_adapter

        record = adapter_base_record(adapter, args.model)
        model = load_adapter(load_base(record, device=device, path=args.model), adapter)
    else:
        from minituner.hf.models import load_hf_model

        model = load_hf_model(args.model, device=device)
    return hf_views(model.eval(), load_hf_tokenizer(args.model))


def add_hf_inference_flags(parser: argparse.ArgumentParser) -> None:
    """--adapter and --device for ``eval`` / ``generate`` of an hf: model."""
    _add(parser, "--adapter", metavar="DIR", help="adapter to apply to an hf: model")
    _add(parser, "--device", default="cpu", help="cpu (default) or cuda")
    _add(parser, "--seed", type=nonneg_int, default=0)
