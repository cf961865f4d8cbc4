"""``minituner eval``: probe accuracy per slice and control perplexity of a run (+ adapter)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval", help="score fill-in-the-blank probes and control perplexity",
        description="Probe file: JSONL lines {\"prompt\": \"yesterday he ___ home\", "
                    "\"candidates\": [\"went\", \"goed\"], \"answer\": \"went\", \"slice\": "
                    "\"irregular-past\"}. Each candidate is filled in and scored by its mean "
                    "log-prob per token from the blank to the end of the sentence.",
    )
    parser.add_argument("--model", required=True,
                        help="run folder: a base, merged or full-FT run, or a LoRA/QLoRA run "
                             "(its base and adapter are used)")
    parser.add_argument("--adapter", default=None, help="adapter folder to apply")
    parser.add_argument("--probes", default=None, metavar="FILE",
                        help="probe JSONL (default: the built-in irregular past/participle, "
                             "regular control and mis-conjugation sets)")
    parser.add_argument("--control", default=None, metavar="FILE",
                        help='control lines for perplexity: JSONL with "text" or "en"/"es" '
                             "(default: the built-in regular-verb control set)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    from minituner.cli.hf_commands import add_hf_inference_flags

    add_hf_inference_flags(parser)  # --device (and --adapter) for --model hf:DIR
    parser.set_defaults(func=run)


def evaluate_args(args) -> dict:
    """The evaluation dict for the parsed arguments (model, adapter, probes, control)."""
    from minituner.course.corpus import read_jsonl
    from minituner.course.data import control_texts
    from minituner.course.evaluate import (
        builtin_path,
        evaluate_model,
        load_builtin_probes,
        load_probes,
    )

    probes = load_probes(args.probes) if args.probes else load_builtin_probes()
    control_file = args.control or builtin_path("control_set")
    texts = control_texts(read_jsonl(control_file), str(control_file))
    if str(args.model).startswith("hf:"):
        from minituner.cli.hf_commands import load_hf_for_inference

        model, tokenizer = load_hf_for_inference(args)
    else:
        from minituner.course.loading import load_run

        model, tokenizer, _ = load_run(args.model, args.adapter)
    return evaluate_model(model, tokenizer, probes, texts)


def run(args) -> int:
    """Print accuracy per slice, <unk> candidates and control perplexity."""
    result = evaluate_args(args)
    if args.json:
        keys = ("slices", "unk_candidates", "control_ppl")
        print(json.dumps({k: result[k] for k in keys}, indent=2, sort_keys=True))
        return 0
    width = max(len(name) for name in result["slices"])
    for name, entry in result["slices"].items():
        print(f"{name.ljust(width)}  accuracy {entry['accuracy']:.3f}  (n={entry['n']})")
    print(f"control perplexity {result['control_ppl']:.4f}")
    for item in result["unk_candidates"]:
        print(f"warning: line {item['line']}: candidate {item['candidate']!r} contains <unk>")
    return 0
