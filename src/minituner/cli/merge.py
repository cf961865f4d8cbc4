"""``minituner merge``: fold an adapter into its base and write a model you can load alone.

A Mini-GPT run (``--model RUN``, a LoRA/QLoRA run folder or a base with ``--adapter``) becomes a
model run folder; a transformers fine-tuning run folder, or a transformers base (``--model
hf:DIR``) with ``--adapter``, becomes a transformers directory that
``AutoModelForCausalLM.from_pretrained`` loads. Both report how far the merged model's logits
are from the unmerged adapter model's.
"""

from __future__ import annotations

from minituner.cli.runfolders import (
    MINIGPT,
    add_hf_merge_flags,
    check_flags,
    is_hf_spec,
    one_line_warnings,
    read_run_folder,
    run_hf_merge_command,
    verify_base,
)


def register(subparsers) -> None:
    """Add the ``merge`` subcommand."""
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into its base and write the merged model",
        description="dequantized (default): float weights, outputs equal the unmerged model up "
                    "to rounding; requantized: an NF4 base is quantized again with fresh scales "
                    "(outputs move; the report says how far).",
    )
    parser.add_argument("--model", default=None,
                        help="run folder (Mini-GPT or transformers), or hf:DIR (default for a "
                             "transformers adapter: the base it records)")
    parser.add_argument("--adapter", default=None, help="adapter folder (PEFT layout)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--target", choices=("dequantized", "requantized"), default=None,
                        help="dequantized (default) or requantized")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out that minituner wrote (atomically)")
    add_hf_merge_flags(parser)  # --device for transformers models
    parser.set_defaults(func=run)


def _transformers_merge(args) -> tuple | None:
    """(base spec or None, adapter) when the merge is of a transformers model, else None."""
    from minituner.hf.merge import recorded_hf_base

    if args.model is None:
        if args.adapter is None:
            raise ValueError("merge needs --model (a run folder or hf:DIR), --adapter, or both")
        if recorded_hf_base(args.adapter) is None:
            raise ValueError(f"--model: {args.adapter} does not record a transformers base; "
                             "give the base (a Mini-GPT run folder or hf:DIR)")
        return None, args.adapter
    if is_hf_spec(args.model):
        return args.model, args.adapter
    run = read_run_folder(args.model)
    check_flags(args, run.model_kind)
    if run.model_kind == MINIGPT:
        return None
    from minituner.hf.inference import run_adapter_dir

    return None, args.adapter or run_adapter_dir(run.path)


def merge_minigpt(args) -> dict:
    """Merge a Mini-GPT LoRA/QLoRA adapter and write a model run folder; returns the report."""
    import torch

    from minituner.course.loading import load_run
    from minituner.lora import merge_and_unload, merge_lora
    from minituner.training.runs import check_replaceable, prepare_run_dir, save_model, write_config
    from minituner.util.files import atomic_directory, atomic_write_json, check_out_apart

    if args.model is None:
        raise ValueError("--model: give the Mini-GPT run folder (or hf:DIR)")
    check_out_apart(args.out, {"--model": args.model, "--adapter": args.adapter})
    model, tokenizer, description = load_run(args.model, args.adapter,
                                             verify_base=verify_base(args))
    probe = torch.randint(0, model.config.vocab_size, (8, model.config.context_len),
                          generator=torch.Generator().manual_seed(0))
    quantized = description.get("adapter_kind") == "qlora"
    if args.target == "requantized" and not quantized:
        raise ValueError("--target requantized needs a QLoRA adapter (an NF4 base)")
    report = merge_lora(model, probe=probe, target=args.target if quantized else None)
    merge_and_unload(model)
    config = {"kind": "merged", "model": model.config.to_dict(), "merged_from": description,
              "merge": {"target": report.target, "n_layers": report.n_layers,
                        "max_abs_diff": report.max_abs_diff,
                        "mean_abs_diff": report.mean_abs_diff}}
    if args.overwrite:
        check_replaceable(args.out)  # only a folder minituner wrote
    else:
        prepare_run_dir(args.out, config)  # refuses a folder holding anything else
    with atomic_directory(args.out) as staging:  # the old output stays until the new is whole
        save_model(staging, model, tokenizer)
        write_config(staging, config)
        atomic_write_json(staging / "merge_report.json", config["merge"])
    return config["merge"]


def run(args) -> int:
    """Merge, write, print the drift (adapter warnings as one stderr line each)."""
    with one_line_warnings():
        return _run(args)


def _run(args) -> int:
    transformers = _transformers_merge(args)
    if transformers is not None:
        return run_hf_merge_command(args, *transformers)
    report = merge_minigpt(args)
    print(f"merged {report['n_layers']} layers ({report['target']}) -> {args.out}; max |logit "
          f"diff| vs the unmerged model {report['max_abs_diff']:.3g}")
    return 0
