"""``minituner memory``: predict training memory by bucket before building anything."""

from __future__ import annotations

import json

from minituner.cli.common import nonneg_int, positive_int
from minituner.training.memory import GB, GIB

DTYPES = ("fp32", "bf16", "fp16")


def register(subparsers) -> None:
    """Add the ``memory`` subcommand."""
    parser = subparsers.add_parser(
        "memory", help="predict training memory (weights, gradients, optimizer, activations)",
        description="Predict the bytes a fine-tuning method needs, in four buckets. Models: "
                    "minigpt, gpt2-small, llama-7b/13b/33b/65b, or hf:DIR (a local "
                    "transformers directory with config.json).",
    )
    parser.add_argument("--model", default="minigpt", help="model name or hf:DIR")
    parser.add_argument("--method", default="lora", choices=["full", "full-mixed", "lora", "qlora"])
    parser.add_argument("--rank", type=nonneg_int, default=8, help="LoRA rank")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seq", type=positive_int, default=None,
                        help="tokens per sequence (default: the model's context length)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--base-dtype", choices=DTYPES, default=None,
                        help="stored weights outside NF4 (default: fp32 for full, fp16 for "
                             "full-mixed, bf16 for lora/qlora)")
    parser.add_argument("--adapter-dtype", choices=DTYPES, default="fp32",
                        help="LoRA A, B and their gradients")
    parser.add_argument("--compute-dtype", choices=DTYPES, default=None,
                        help="activation dtype (default follows --base-dtype's method default)")
    parser.add_argument("--quant", choices=["nf4-dq", "nf4"], default="nf4-dq",
                        help="qlora base format")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                        help="eager attention also saves the (batch, heads, seq, seq) scores")
    parser.add_argument("--qlora-paper", action="store_true",
                        help="the QLoRA paper's settings: qlora, r=64, bf16 adapters, gradient "
                             "checkpointing, batch 1 x 512 (other flags are ignored)")
    parser.add_argument("--course-table", action="store_true",
                        help="print the course's simplified Mini-GPT table instead")
    parser.add_argument("--devices", type=positive_int, default=1,
                        help="processes, one per device (with --fsdp: the per-device peak)")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2: weights, gradients and Adam state sharded over --devices, "
                             "plus the gathered root and two gathered blocks")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def _gb(n: float) -> str:
    return f"{n / GB:,.3f}"


def _gib(n: float) -> str:
    return f"{n / GIB:,.3f}"


def format_plan(plan) -> str:
    """A bucket table (bytes, GB = 10^9 bytes, GiB = 2^30 bytes) with its breakdown."""
    a = plan.assumptions
    lines = [
        f"{plan.model}: {a['method']}, rank {a['rank']}, batch {a['batch']} x seq {a['seq']}"
        f"{', gradient checkpointing' if a['grad_checkpointing'] else ''}"
        f"{_per_device(a)}",
        f"{'bucket':<34}{'bytes':>18}{'GB':>12}{'GiB':>12}",
    ]
    for bucket, value in plan.buckets.items():
        lines.append(f"{bucket:<34}{value:>18,}{_gb(value):>12}{_gib(value):>12}")
        for key, part in plan.details.items():
            if key.startswith(bucket + "."):
                lines.append(f"  {key.split('.', 1)[1]:<32}{part:>18,}{_gb(part):>12}"
                             f"{_gib(part):>12}")
    total = plan.total_bytes
    lines.append(f"{'total':<34}{total:>18,}{_gb(total):>12}{_gib(total):>12}")
    lines.append(f"assumptions: {a['method_note']}; base {a['base_dtype']}, adapters "
                 f"{a['adapter_dtype']}, compute {a['compute_dtype']}, {a['attention']} "
                 f"attention; {a['optimizer']}; {a['trainable_params']:,} trainable of "
                 f"{a['n_params']:,} parameters")
    return "\n".join(lines)


def _per_device(a: dict) -> str:
    if a.get("fsdp"):
        return f", FSDP over {a['devices']} devices (per device)"
    return ""


def format_course_table(rows: list) -> str:
    """The course's simplified table, labelled as such."""
    lines = [
        "Mini-GPT memory, the course's simplified model (not the planner's): 16 bytes per "
        "trainable parameter (fp16 weight + fp32 master + fp16 gradient + Adam m, v), 2 bytes "
        "per frozen 16-bit weight, NF4 at 4.127 bits, activations = batch x seq x d_model x "
        "n_layers x 16 bytes (batch 16, seq 32).",
        f"{'regime':<18}{'trainable':>11}{'weights':>11}{'gradients':>11}{'optimizer':>11}"
        f"{'activations':>13}{'total':>11}",
    ]
    for row in rows:
        lines.append(
            f"{row['regime']:<18}{row['trainable_params']:>11,}{row['weights']:>11,}"
            f"{row['gradients']:>11,}{row['optimizer']:>11,}{row['activations']:>13,}"
            f"{row['total']:>11,}"
        )
    lines.append("(bytes)")
    return "\n".join(lines)


def plan_from_args(args):
    """The MemoryPlan the flags ask for."""
    from minituner.training.memory import plan_memory, qlora_paper_settings

    shards = {"devices": args.devices, "fsdp": args.fsdp}
    if args.qlora_paper:
        settings = qlora_paper_settings()
        return plan_memory(args.model, settings.pop("method"), **settings, **shards)
    return plan_memory(
        args.model, args.method, rank=args.rank, batch=args.batch, seq=args.seq,
        grad_checkpointing=args.grad_checkpointing, base_dtype=args.base_dtype,
        adapter_dtype=args.adapter_dtype, compute_dtype=args.compute_dtype, quant=args.quant,
        attention=args.attention, **shards,
    )


def run(args) -> int:
    """Print the plan (or the course table) as a table or JSON."""
    if args.course_table:
        from minituner.training.memory import course_table

        rows = course_table()
        print(json.dumps(rows, indent=2) if args.json else format_course_table(rows))
        return 0
    plan = plan_from_args(args)
    print(json.dumps(plan.to_dict(), indent=2, sort_keys=False) if args.json else format_plan(plan))
    return 0
