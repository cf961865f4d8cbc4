"""``minituner corpus``: write the bilingual verb corpus and its tokenizer."""

from __future__ import annotations

import json

from minituner.cli.common import nonneg_int


def register(subparsers) -> None:
    """Add the ``corpus`` subcommand."""
    parser = subparsers.add_parser(
        "corpus", help="write the bilingual verb corpus (JSONL splits, manifest, tokenizer)",
        description="Generate the deterministic English/Spanish verb corpus.",
    )
    parser.add_argument("--out", default="runs/corpus", help="output folder (default runs/corpus)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="split seed (default 0)")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Write the corpus and print its counts."""
    from minituner.course.pretraining import build_corpus

    manifest, tokenizer = build_corpus(args.out, seed=args.seed)
    print(json.dumps(manifest["counts"], sort_keys=True))
    print(f"tokenizer: {tokenizer.vocab_size} tokens; corpus written to {args.out}")
    return 0
