"""``minituner eval``: probe accuracy per slice and control perplexity of a run (+ adapter)."""

from __future__ import annotations

import json
import sys

from minituner.cli.runfolders import (
    MINIGPT,
    adapter_choice,
    add_hf_inference_flags,
    load_for_inference,
)

MAX_LISTED = 5  # <unk> candidates named in the warning line


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
                        help="run folder (a Mini-GPT base, merged, full-FT or LoRA/QLoRA run, or "
                             "a transformers fine-tuning run: its base and adapter are used), or "
                             "hf:DIR for a transformers model")
    parser.add_argument("--probes", default=None, metavar="FILE",
                        help="probe JSONL (default for Mini-GPT models: the built-in verb probes)")
    parser.add_argument("--verb-probes", action="store_true",
                        help="also score the built-in verb probes (irregular past/participle, "
                             "regular control, mis-conjugations); Mini-GPT models score them "
                             "unless --probes is given, transformers models only with this flag")
    parser.add_argument("--control", default=None, metavar="FILE",
                        help='control data for perplexity: JSONL of {"prompt", "completion"} '
                             '(the completion tokens are scored) or {"text"} / {"en", "es"} '
                             "(whole lines); default: the built-in regular-verb control set")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_hf_inference_flags(parser)  # --adapter, --device (transformers models)
    parser.set_defaults(func=run)


def probes_for(args, kind: str) -> list:
    """The probes to score: --probes, plus the built-in verb probes for Mini-GPT (unless
    --probes is given) or when --verb-probes asks."""
    from minituner.course.evaluate import load_builtin_probes, load_probes

    probes = load_probes(args.probes) if args.probes else []
    if args.verb_probes or (kind == MINIGPT and not args.probes):
        probes += load_builtin_probes()
    return probes


def evaluate_args(args) -> dict:
    """The evaluation dict for the parsed arguments (model, adapter, probes, control); with
    named adapters, {"adapters": {name: evaluation}}, each adapter active in turn."""
    from minituner.course.evaluate import (
        BUILTIN_CONTROL,
        builtin_path,
        control_sequences,
        evaluate_model,
    )
    from minituner.util.jsonl import read_jsonl

    model, tokenizer, kind = load_for_inference(args)
    probes = probes_for(args, kind)
    control_file = args.control or builtin_path(BUILTIN_CONTROL)
    records = read_jsonl(control_file)
    if not records:
        raise ValueError(f"{control_file}: no control records")
    control = control_sequences(tokenizer, records, str(control_file))
    adapters = adapter_choice(args)
    if not isinstance(adapters, dict):
        return evaluate_model(model, tokenizer, probes, control)
    from minituner.lora.multi import set_adapter

    results = {}
    for name in adapters:
        set_adapter(model, name)
        results[name] = evaluate_model(model, tokenizer, probes, control)
    return {"adapters": results}


def warn_unk(unk: list) -> None:
    """One stderr line for the probe candidates that contain <unk> (scored, but unreliably)."""
    if not unk:
        return
    shown = ", ".join(f"line {item['line']} {item['candidate']!r}" for item in unk[:MAX_LISTED])
    more = f" and {len(unk) - MAX_LISTED} more" if len(unk) > MAX_LISTED else ""
    print(f"warning: {len(unk)} probe candidate(s) contain <unk> for this tokenizer ({shown}"
          f"{more}); their scores are unreliable", file=sys.stderr)


RESULT_KEYS = ("slices", "unk_candidates", "control_ppl")


def print_adapter_table(results: dict) -> None:
    """One row per adapter: accuracy per slice, then control perplexity."""
    slices = list(next(iter(results.values()))["slices"])
    width = max(len("adapter"), *(len(name) for name in results))
    columns = [max(len(s), 5) for s in slices]
    print("  ".join(["adapter".ljust(width), *(s.rjust(c) for s, c in zip(slices, columns,
                                                                          strict=True)),
                     "control_ppl"]))
    for name, result in results.items():
        cells = [f"{result['slices'][s]['accuracy']:.3f}".rjust(c)
                 for s, c in zip(slices, columns, strict=True)]
        print("  ".join([name.ljust(width), *cells, f"{result['control_ppl']:.4f}".rjust(11)]))


def run(args) -> int:
    """Print accuracy per slice and control perplexity (a table row per named adapter);
    <unk> candidates go to stderr."""
    result = evaluate_args(args)
    if "adapters" in result:
        results = result["adapters"]
        warn_unk(next(iter(results.values()))["unk_candidates"])
        if args.json:
            print(json.dumps({"adapters": {name: {k: r[k] for k in RESULT_KEYS}
                                           for name, r in results.items()}},
                             indent=2, sort_keys=True))
        else:
            print_adapter_table(results)
        return 0
    warn_unk(result["unk_candidates"])
    if args.json:
        print(json.dumps({k: result[k] for k in RESULT_KEYS}, indent=2, sort_keys=True))
        return 0
    width = max((len(name) for name in result["slices"]), default=0)
    for name, entry in result["slices"].items():
        print(f"{name.ljust(width)}  accuracy {entry['accuracy']:.3f}  (n={entry['n']})")
    print(f"control perplexity {result['control_ppl']:.4f}")
    return 0
