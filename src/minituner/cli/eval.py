"""``minituner eval``: probe accuracy per slice and control perplexity of a run (+ adapter), or
loss, perplexity, token accuracy and exact match on the user's own data (``--data``)."""

from __future__ import annotations

import json
import sys

from minituner.cli.runfolders import (
    MINIGPT,
    adapter_choice,
    add_hf_inference_flags,
    chat_template_for,
    is_hf_spec,
    load_for_inference,
    read_run_folder,
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
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="transformers models: score this JSONL (prompt/completion, text or "
                             "messages lines, as fine-tuning reads them): loss, perplexity and "
                             "next-token accuracy on the completion/assistant tokens only; "
                             "probes and control perplexity then only when asked for")
    parser.add_argument("--exact-match", action="store_true", default=None,
                        help="with --data: also the share of greedy generations equal to the "
                             "completions (the last assistant turn of messages lines)")
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


def data_rendering(args, hf_tokenizer, records: list):
    """How --data records become tokens: the run's chat template for messages lines and its
    --chat-template setting for prompts (an hf:DIR model: its tokenizer's template, plain
    prompts)."""
    from minituner.hf.chat import uses_template
    from minituner.hf.scoring import DataRendering

    chat_prompts = False
    if not is_hf_spec(args.model):
        chat_prompts = bool(read_run_folder(args.model).config.get("finetune", {})
                            .get("chat_template"))
    if not uses_template(records, chat_prompts):
        return DataRendering()
    return DataRendering(chat_template_for(args, hf_tokenizer)[0], chat_prompts)


def prepare_data(args, tokenizer) -> tuple:
    """(records, encoded sequences cut to the context, rendering) of --data."""
    from minituner.hf.data import read_examples
    from minituner.hf.scoring import encode_for_scoring, fit_context

    records = [record for _, record in read_examples(args.data)]
    rendering = data_rendering(args, tokenizer.hf, records)
    encoded = [fit_context(encode_for_scoring(tokenizer.hf, r, rendering), tokenizer.context_len)
               for r in records]
    sequences = [s for s in encoded if s is not None]
    if not sequences:
        raise ValueError(f"{args.data}: no example keeps a target token within the context")
    return records, sequences, rendering


def evaluate_data(args, model, tokenizer, data: tuple) -> dict:
    """Loss, perplexity and token accuracy on --data (and exact match when asked)."""
    from minituner.hf.scoring import exact_match, token_metrics

    records, sequences, rendering = data
    result = {"file": str(args.data), "examples": len(records),
              **token_metrics(model, sequences, tokenizer.pad_id)}
    if args.exact_match:
        result.update(exact_match(model.inner, tokenizer.hf, records, rendering))
    return result


def evaluate_args(args) -> dict:
    """The evaluation dict for the parsed arguments (model, adapter, probes, control, data);
    with named adapters, {"adapters": {name: evaluation}}, each adapter active in turn."""
    from minituner.course.evaluate import (
        BUILTIN_CONTROL,
        builtin_path,
        control_sequences,
        evaluate_model,
    )
    from minituner.util.jsonl import read_jsonl

    if args.exact_match and not args.data:
        raise ValueError("--exact-match: needs --data FILE")
    model, tokenizer, kind = load_for_inference(args)
    probes = probes_for(args, kind)
    data = prepare_data(args, tokenizer) if args.data else None
    control = None
    if data is None or args.control or probes:
        control_file = args.control or builtin_path(BUILTIN_CONTROL)
        records = read_jsonl(control_file)
        if not records:
            raise ValueError(f"{control_file}: no control records")
        control = control_sequences(tokenizer, records, str(control_file))

    def evaluate() -> dict:
        result = {}
        if control is not None:
            result = evaluate_model(model, tokenizer, probes, control)
        if data is not None:
            result["data"] = evaluate_data(args, model, tokenizer, data)
        return result

    adapters = adapter_choice(args)
    if not isinstance(adapters, dict):
        return evaluate()
    from minituner.lora.multi import set_adapter

    results = {}
    for name in adapters:
        set_adapter(model, name)
        results[name] = evaluate()
    return {"adapters": results}


def warn_unk(unk: list) -> None:
    """One stderr line for the probe candidates that contain <unk> (scored, but unreliably)."""
    if not unk:
        return
    shown = ", ".join(f"line {item['line']} {item['candidate']!r}" for item in unk[:MAX_LISTED])
    more = f" and {len(unk) - MAX_LISTED} more" if len(unk) > MAX_LISTED else ""
    print(f"warning: {len(unk)} probe candidate(s) contain <unk> for this tokenizer ({shown}"
          f"{more}); their scores are unreliable", file=sys.stderr)


RESULT_KEYS = ("slices", "unk_candidates", "control_ppl", "data")


def print_data(data: dict) -> None:
    """The --data lines: loss, perplexity, token accuracy (and exact match)."""
    print(f"data {data['file']}: {data['examples']} examples, {data['tokens']} scored tokens")
    print(f"loss {data['loss']:.4f}  perplexity {data['perplexity']:.4f}  "
          f"token accuracy {data['token_accuracy']:.4f}")
    if "exact_match" in data:
        share = "n/a" if data["exact_match"] is None else f"{data['exact_match']:.4f}"
        print(f"exact match {share} (n={data['n']})")


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


def print_result(result: dict) -> None:
    """Accuracy per slice, control perplexity and the --data lines, those present."""
    width = max((len(name) for name in result.get("slices", {})), default=0)
    for name, entry in result.get("slices", {}).items():
        print(f"{name.ljust(width)}  accuracy {entry['accuracy']:.3f}  (n={entry['n']})")
    if "control_ppl" in result:
        print(f"control perplexity {result['control_ppl']:.4f}")
    if "data" in result:
        print_data(result["data"])


def run(args) -> int:
    """Print accuracy per slice and control perplexity (a table row per named adapter) and
    the --data metrics; <unk> candidates go to stderr."""
    result = evaluate_args(args)
    if "adapters" in result:
        results = result["adapters"]
        warn_unk(next(iter(results.values())).get("unk_candidates", []))
        if args.json:
            print(json.dumps({"adapters": {name: {k: r[k] for k in RESULT_KEYS if k in r}
                                           for name, r in results.items()}},
                             indent=2, sort_keys=True))
        elif args.data:
            for name, one in results.items():
                print(f"[{name}]")
                print_result(one)
        else:
            print_adapter_table(results)
        return 0
    warn_unk(result.get("unk_candidates", []))
    if args.json:
        print(json.dumps({k: result[k] for k in RESULT_KEYS if k in result}, indent=2,
                         sort_keys=True))
        return 0
    print_result(result)
    return 0
