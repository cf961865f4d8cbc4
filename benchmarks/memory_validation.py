"""Check the memory planner against measured peak RSS on a GPT-2-small-shaped model.

Each configuration runs in a fresh subprocess: it imports everything and warms up torch on a
tiny model (kernels, thread pools, allocator), records its resident memory, then builds the
random-init GPT-2-small-shaped model (benchmarks/gpt2_shape.py), trains a few AdamW steps and
reads its peak RSS (VmHWM). The measured figure is peak RSS minus the RSS recorded before
building; the prediction is ``plan_memory("gpt2-small", ...)`` with the same method, batch,
sequence and dtypes. Goal: prediction within 15% of the measurement. Writes
benchmarks/results/memory_validation.json.

Every configuration runs under three allocator settings: minituner's own (``minituner
finetune`` on the CPU fixes glibc's mmap threshold at 1 MiB,
:func:`minituner.util.files.pin_mmap_threshold`, and so do these processes), glibc's
growing threshold (``MINITUNER_MMAP_THRESHOLD=glibc``) and a 128 KiB fixed threshold
(``MALLOC_MMAP_THRESHOLD_=131072``). glibc's own threshold rises after it frees large blocks, so
freed activations of up to 32 MB stay in the heap and count as resident; a fixed threshold
returns them to the system, so peak RSS follows live tensors. Rows also record the training
throughput (target tokens per second; ``--plan`` runs) to show what each setting costs.

    .venv/bin/python benchmarks/memory_validation.py
    .venv/bin/python benchmarks/memory_validation.py --plan   # finetune --plan's prediction
    .venv/bin/python benchmarks/memory_validation.py --plan --steps 6 --repeats 3  # and speed

With ``--plan`` the same measurement checks ``finetune --plan`` instead: a random-init
GPT-2-small-shaped transformers model (``minituner.hf_toy``, gpt2-small) and a data file of
examples exactly ``--seq`` tokens long; each child computes the plan of the exact run
(:func:`minituner.hf.plan.plan_finetune`), warms up with one step of the same run on a tiny
GPT-2 (transformers' model code and the run's own paths imported and touched, as the warm-up
above does for the plain model), records its RSS, runs ``finetune`` (LoRA or QLoRA,
``--steps`` steps, batch ``--batch``, fp32, CPU) in-process and compares the plan's predicted
peak with the measured peak-RSS growth. Writes benchmarks/results/memory_validation_plan.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import (
    ALLOCATORS,
    load_average,
    run_json_child,
    vm_hwm_bytes,
    vm_rss_bytes,
    write_results,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory_validation.json"
METHODS = ("full", "lora", "qlora")
TOLERANCE = 0.15


def warm_up() -> None:
    """Touch every code path once on tiny tensors, so their one-off costs precede the baseline."""
    import torch
    import torch.nn.functional as F

    from minituner.quant.nf4 import quantize_nf4
    from minituner.training.loop import build_optimizer

    layer = torch.nn.Linear(64, 192)
    optimizer = build_optimizer(layer, lr=1e-3)
    x = torch.randn(2, 8, 64, requires_grad=True)
    q, k, v = layer(x).view(2, 8, 3, 4, 16).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    logits = F.gelu(F.layer_norm(out.sum(0), (16,)), approximate="tanh")
    F.cross_entropy(logits.reshape(-1, 16), torch.zeros(32, dtype=torch.long)).backward()
    optimizer.step()
    quantize_nf4(torch.randn(512, 512)).dequantize()


def child(method: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    """Build, train and measure one configuration in this process."""
    import torch
    from gpt2_shape import build

    from minituner.training.loop import build_optimizer
    from minituner.training.memory import plan_memory
    from minituner.util.files import pin_mmap_threshold

    torch.set_num_threads(threads)
    pin_mmap_threshold()  # as `minituner finetune` does on the CPU (unless the environment says)
    warm_up()
    gc.collect()
    baseline, peak_before = vm_rss_bytes(), vm_hwm_bytes()
    started = time.perf_counter()
    model = build(method)
    built_rss = vm_rss_bytes()
    optimizer = build_optimizer(model, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 50257, (batch, seq), generator=generator)
        targets = torch.randint(0, 50257, (batch, seq), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        del loss
    measured = vm_hwm_bytes() - baseline
    plan = plan_memory("gpt2-small", method, rank=8, batch=batch, seq=seq, base_dtype="fp32",
                       compute_dtype="fp32", adapter_dtype="fp32")
    return {
        "method": method, "batch": batch, "seq": seq, "steps": steps, "threads": threads,
        "baseline_rss_bytes": baseline, "peak_rss_before_build_bytes": peak_before,
        "rss_after_build_bytes": built_rss, "peak_rss_bytes": vm_hwm_bytes(),
        "measured_growth_bytes": measured, "predicted_bytes": plan.total_bytes,
        "predicted_buckets": plan.buckets, "predicted_details": plan.details,
        "ratio_predicted_to_measured": plan.total_bytes / measured,
        "seconds": time.perf_counter() - started,
    }


PLAN_RESULTS = HERE / "results" / "memory_validation_plan.json"
PLAN_METHODS = ("lora", "qlora")


def plan_child(method: str, model: str, data: str, batch: int, steps: int, threads: int,
               out: str) -> dict:
    """Plan one finetune run, then run it in this process and measure its peak-RSS growth."""
    import matplotlib.pyplot  # noqa: F401  (the run plots its loss: import it before the baseline)
    import torch

    from minituner.hf.finetune import run_hf_finetune
    from minituner.hf.plan import plan_finetune
    from minituner.training.config import FinetuneConfig
    from minituner.util.files import pin_mmap_threshold

    torch.set_num_threads(threads)
    pin_mmap_threshold()  # as `minituner finetune` does on the CPU (unless the environment says)
    cfg = FinetuneConfig.for_kind("hf", model=f"hf:{model}", train_data=data, method=method,
                                  batch_size=batch, steps=steps, dtype="fp32", threads=threads,
                                  eval_every=steps, checkpoint_every=steps)
    plan = plan_finetune(cfg, "cpu")
    warm_up()
    warm_up_finetune(cfg, Path(out).parent / f"warm-{Path(out).name}")
    gc.collect()
    baseline = vm_rss_bytes()
    started = time.perf_counter()
    results = run_hf_finetune(cfg, out, device="cpu")
    measured = vm_hwm_bytes() - baseline
    predicted = plan["memory"]["total_bytes"]
    return {
        "method": method, "batch": batch, "seq": plan["memory"]["seq"], "steps": steps,
        "threads": threads, "baseline_rss_bytes": baseline, "peak_rss_bytes": vm_hwm_bytes(),
        "measured_growth_bytes": measured, "predicted_bytes": predicted,
        "predicted_buckets": plan["memory"]["buckets"],
        "run_results_memory": results["memory"],
        "plan_equals_run_prediction": results["memory"]["predicted"] == plan["memory"],
        "ratio_predicted_to_measured": predicted / measured,
        "target_tokens_per_s": results["target_tokens_per_s"],
        "seconds": time.perf_counter() - started,
    }


def warm_up_finetune(cfg, root: Path) -> None:
    """One step of the same finetune on a tiny GPT-2: transformers' model code, the tokenizer,
    the loss and the run writer are imported and touched before the baseline."""
    from minituner.hf.finetune import run_hf_finetune
    from minituner.hf.toy import write_toy_model

    model = write_toy_model(root / "tiny", arch="gpt2")
    tiny = cfg.replace(model=f"hf:{model}", steps=1, batch_size=1, eval_every=1,
                       checkpoint_every=1)
    run_hf_finetune(tiny, root / "run", device="cpu")


def write_plan_inputs(root: Path, seq: int, n: int) -> tuple:
    """The GPT-2-small-shaped toy model and ``n`` text examples of exactly ``seq`` inputs."""
    from minituner.hf.toy import WORDS, write_toy_model

    model = write_toy_model(root / "gpt2-small", arch="gpt2", size="gpt2-small")
    words = [w for w in WORDS if w.isalpha()]
    data = root / "data.jsonl"
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(seq))})
             for i in range(n)]
    data.write_text("\n".join(lines) + "\n")
    return model, data


def plan_main(args) -> int:
    """Run the --plan check: both methods under both allocator settings."""
    import tempfile

    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = write_plan_inputs(Path(tmp), args.seq, 4 * args.batch)
        for round_number in range(args.repeats):  # alternate the order: drift hits all sides
            settings = list(ALLOCATORS.items())
            for allocator, env in settings if round_number % 2 == 0 else settings[::-1]:
                for method in PLAN_METHODS:
                    run_out = Path(tmp) / f"run-{allocator}-{method}-{round_number}"
                    row = run_json_child([__file__, "--plan-child", method, "--model", model,
                                          "--data", data, "--batch", args.batch, "--steps",
                                          args.steps, "--threads", args.threads,
                                          "--run-out", run_out], env=env)
                    row.update(allocator=allocator, round=round_number, within_tolerance=abs(
                        row["ratio_predicted_to_measured"] - 1) <= TOLERANCE)
                    rows.append(row)
                    print(f"done {allocator} {method} round {round_number}", file=sys.stderr,
                          flush=True)
    out = args.out if args.out != RESULTS else PLAN_RESULTS
    summary = allocator_summary(rows)
    write_results(out, {
        "benchmark": "finetune --plan's predicted peak vs measured peak-RSS growth, GPT-2-small "
                     "shape (transformers, random init), CPU fp32",
        "tolerance": TOLERANCE, "rows": rows, "by_allocator": summary,
        "load_average_before": load_before,
    })
    print(f"finetune --plan, GPT-2-small shape (transformers), batch {args.batch} x {args.seq}, "
          f"{args.steps} steps, {args.threads} threads, fp32, {args.repeats} round(s)")
    print_table(rows)
    print()
    print_allocator_summary(summary)
    return 0


BASELINE_ALLOCATOR = "glibc-growing"


def allocator_summary(rows: list) -> list:
    """Per method and allocator setting: the medians over the rounds of predicted / measured
    and of target tokens per second, and that throughput over glibc's own setting's."""
    summary = []
    for method in PLAN_METHODS:
        medians = {}
        for allocator in ALLOCATORS:
            mine = [r for r in rows if r["method"] == method and r["allocator"] == allocator]
            medians[allocator] = {
                "ratio": statistics.median(r["ratio_predicted_to_measured"] for r in mine),
                "tokens_per_s": statistics.median(r["target_tokens_per_s"] for r in mine),
                "rounds": len(mine)}
        base = medians[BASELINE_ALLOCATOR]["tokens_per_s"]
        summary += [{"method": method, "allocator": allocator, **values,
                     "throughput_vs_glibc": values["tokens_per_s"] / base}
                    for allocator, values in medians.items()]
    return summary


def print_allocator_summary(summary: list) -> None:
    """Medians over the rounds: the planner's ratio and what each allocator setting costs."""
    print("| method | allocator | rounds | median predicted / measured | median target tokens/s "
          f"| throughput vs {BASELINE_ALLOCATOR} |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['method']} | {row['allocator']} | {row['rounds']} | {row['ratio']:.3f} "
              f"| {row['tokens_per_s']:,.1f} | {row['throughput_vs_glibc']:.3f} |")


def print_table(rows: list) -> None:
    """The README table of predicted vs measured peak-RSS growth, one row per run (with the
    training throughput when the rows have it)."""
    speed = all("target_tokens_per_s" in row for row in rows)
    print("| allocator | method | predicted (MB) | measured peak-RSS growth (MB) "
          "| predicted / measured | within 15% |" + (" target tokens/s |" if speed else ""))
    print("|---|---|---|---|---|---|" + ("---|" if speed else ""))
    for row in rows:
        print(f"| {row['allocator']} | {row['method']} | {row['predicted_bytes'] / 1e6:,.0f} "
              f"| {row['measured_growth_bytes'] / 1e6:,.0f} "
              f"| {row['ratio_predicted_to_measured']:.3f} | {row['within_tolerance']} |"
              + (f" {row['target_tokens_per_s']:,.1f} |" if speed else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="--plan: rounds over every allocator setting, order alternating")
    parser.add_argument("--plan", action="store_true",
                        help="check finetune --plan on a transformers GPT-2-small shape")
    parser.add_argument("--plan-child", choices=PLAN_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_child:
        print(json.dumps(plan_child(args.plan_child, args.model, args.data, args.batch,
                                    args.steps, args.threads, args.run_out)))
        return 0
    if args.plan:
        return plan_main(args)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq, args.steps, args.threads)))
        return 0
    load_before = load_average()
    rows = []
    for allocator, env in ALLOCATORS.items():
        for method in METHODS:
            row = run_json_child([__file__, "--child", method, "--batch", args.batch,
                                  "--seq", args.seq, "--steps", args.steps,
                                  "--threads", args.threads], env=env)
            row["allocator"] = allocator
            row["within_tolerance"] = abs(row["ratio_predicted_to_measured"] - 1) <= TOLERANCE
            rows.append(row)
            print(f"done {allocator} {method}", file=sys.stderr, flush=True)
    write_results(args.out, {
        "benchmark": "memory planner vs measured peak-RSS growth, GPT-2-small shape, random init",
        "tolerance": TOLERANCE, "rows": rows, "load_average_before": load_before,
    })
    print(f"GPT-2-small shape, batch {args.batch} x {args.seq}, {args.steps} AdamW steps, "
          f"{args.threads} threads, fp32")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
