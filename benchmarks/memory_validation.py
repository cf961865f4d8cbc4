"""Check the memory planner against measured peak RSS on a GPT-2-small-shaped model.

Each configuration runs in a fresh subprocess: it imports everything and warms up torch on a
tiny model (kernels, thread pools, allocator), records its resident memory, then builds the
random-init GPT-2-small-shaped model (benchmarks/gpt2_shape.py), trains a few AdamW steps and
reads its peak RSS (VmHWM). The measured figure is peak RSS minus the RSS recorded before
building; the prediction is ``plan_memory("gpt2-small", ...)`` with the same method, batch,
sequence and dtypes. Goal: prediction within 15% of the measurement. Writes
benchmarks/results/memory_validation.json.

Every configuration runs twice: with glibc's default allocator settings, and with a fixed mmap
threshold (MALLOC_MMAP_THRESHOLD_=131072). By default glibc raises its mmap threshold after
freeing large blocks, so freed activations of up to 32 MB stay in the heap and count as
resident; the fixed threshold returns them to the system, so peak RSS follows live tensors.

    .venv/bin/python benchmarks/memory_validation.py
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from bench_common import load_average, run_json_child, vm_hwm_bytes, vm_rss_bytes, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory_validation.json"
METHODS = ("full", "lora", "qlora")
TOLERANCE = 0.15
ALLOCATORS = {"glibc-default": {}, "fixed-mmap-threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


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

    torch.set_num_threads(threads)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
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
    print("| allocator | method | predicted (MB) | measured peak-RSS growth (MB) "
          "| predicted / measured | within 15% |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['allocator']} | {row['method']} | {row['predicted_bytes'] / 1e6:,.0f} "
              f"| {row['measured_growth_bytes'] / 1e6:,.0f} "
              f"| {row['ratio_predicted_to_measured']:.3f} | {row['within_tolerance']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
