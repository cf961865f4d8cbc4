"""``minituner count``: LoRA's trainable parameters per Linear of the default Mini-GPT."""

from __future__ import annotations

import json

from minituner.cli.common import nonneg_int


def register(subparsers) -> None:
    """Add the ``count`` subcommand."""
    parser = subparsers.add_parser(
        "count", help="table of LoRA trainable parameters per Linear of the default Mini-GPT",
        description="For each targeted Linear: shape (out, in), full weight parameters, the "
                    "r*(in+out) LoRA adds and their ratio, with totals (2304 r for all 12).",
    )
    parser.add_argument("--rank", "-r", type=nonneg_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--targets", nargs="+", default=None, metavar="NAME",
        help="module names matched as dotted suffixes, or all-linear "
             "(default: q_proj k_proj v_proj o_proj fc1 fc2)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print the table (text or JSON) for a randomly initialised default Mini-GPT."""
    from minituner.lora import ALL_LINEAR, MINIGPT_TARGETS, lora_param_table
    from minituner.models.minigpt import MiniGPT, MiniGPTConfig

    targets = list(args.targets or MINIGPT_TARGETS)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    table = lora_param_table(MiniGPT(MiniGPTConfig()), args.rank, targets)
    table["targets"] = targets
    if args.json:
        print(json.dumps(table, indent=2, sort_keys=True))
    else:
        print(format_table(table))
    return 0


def format_table(table: dict) -> str:
    """Aligned text rendering of :func:`minituner.lora.lora_param_table`'s result."""
    header = ("name", "shape", "full", f"r*(in+out), r={table['rank']}", "ratio")
    lines = [header]
    for row in table["rows"]:
        shape = "x".join(str(d) for d in row["shape"])
        lines.append((row["name"], shape, f"{row['full_params']:,}", f"{row['lora_params']:,}",
                      f"{row['ratio']:.4f}"))
    totals = table["totals"]
    lines.append((f"total ({totals['n_linears']} Linears)", "", f"{totals['full_params']:,}",
                  f"{totals['lora_params']:,}", f"{totals['ratio']:.4f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    rendered.insert(1, "-" * len(rendered[0]))
    rendered.insert(-1, "-" * len(rendered[0]))
    rendered.append(
        f"model parameters {totals['model_params']:,}; LoRA adds "
        f"{100 * totals['fraction_of_model']:.2f}% of that"
    )
    return "\n".join(rendered)
