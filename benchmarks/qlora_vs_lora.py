"""QLoRA vs LoRA with minituner: step time, peak RSS and weight bytes, each run in a fresh process.

Models: Mini-GPT (canonical, batch 16 x 32) and a random-init GPT-2-small-shaped model
(benchmarks/gpt2_shape.py, batch 4 x 128, r = 8 on c_attn / c_proj / c_fc, as in
baselines.md). Both methods compute in fp32; LoRA's frozen base is fp32, QLoRA's block Linears
are NF4 with double quantization (the rest stays fp32), quantized while the model is built so
the float model never exists whole. Step time: median over the timed steps after 2 warm-up
steps (wall time, and the process's CPU time, which a busy shared machine distorts less); LoRA
and QLoRA processes alternate for a few rounds and the ratios use the medians.
Peak RSS: ru_maxrss of the process (imports included). The GPT-2-shape pair also runs once with a
fixed glibc mmap threshold (see memory_validation.py). Goals: QLoRA step <= 1.3x LoRA, QLoRA
peak RSS <= 0.8x fp32 LoRA on the GPT-2 shape. Writes benchmarks/results/qlora_vs_lora.json.

    .venv/bin/python benchmarks/qlora_vs_lora.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import load_average, run_json_child, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "qlora_vs_lora.json"
SHAPES = {"minigpt": {"batch": 16, "seq": 32, "timed": 30},
          "gpt2-small": {"batch": 4, "seq": 128, "timed": 3}}
ALLOCATORS = {"glibc-default": {}, "fixed-mmap-threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
WARMUP = 2


def build_model(model: str, method: str):
    """A Mini-GPT or GPT-2-shape model with LoRA or QLoRA (r = 8, alpha 16)."""
    if model == "gpt2-small":
        from gpt2_shape import build

        return build(method)
    from minituner.lora import wrap_minigpt_with_lora
    from minituner.models.minigpt import MiniGPT
    from minituner.quant.qlora import wrap_minigpt_qlora

    wrap = wrap_minigpt_qlora if method == "qlora" else wrap_minigpt_with_lora
    return wrap(MiniGPT(), r=8, alpha=16.0, seed=0)


def weight_buckets(model) -> dict:
    """Bytes of trainable parameters, frozen float parameters, NF4 layers and other buffers."""
    from minituner.quant.qlora import QuantizedLinear

    def size(t):
        return t.numel() * t.element_size()

    out = {"trainable": 0, "frozen_float": 0, "nf4_layers": 0, "buffers": 0}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            out["trainable" if p.requires_grad else "frozen_float"] += size(p)
        if isinstance(module, QuantizedLinear):
            out["nf4_layers"] += module.storage_bytes()
        else:
            out["buffers"] += sum(size(b) for b in module.buffers(recurse=False))
    return out


def child(model_name: str, method: str, threads: int) -> dict:
    """Build and train one configuration; return its measurements."""
    import torch

    from minituner.training.loop import build_optimizer
    from minituner.util.files import peak_rss_bytes

    torch.set_num_threads(threads)
    shape = SHAPES[model_name]
    start_rss = peak_rss_bytes()
    started = time.perf_counter()
    model = build_model(model_name, method)
    build_s = time.perf_counter() - started
    optimizer = build_optimizer(model, lr=1e-4)
    vocab = 50257 if model_name == "gpt2-small" else 64
    generator = torch.Generator().manual_seed(0)
    times, cpu_times, losses = [], [], []
    for _ in range(WARMUP + shape["timed"]):
        tokens = torch.randint(0, vocab, (shape["batch"], shape["seq"]), generator=generator)
        targets = torch.randint(0, vocab, (shape["batch"], shape["seq"]), generator=generator)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
        cpu_times.append(time.process_time() - begin_cpu)
        losses.append(loss.item())
    timed = times[WARMUP:]
    return {"model": model_name, "method": method, **shape, "threads": threads,
            "step_s_median": statistics.median(timed), "step_s_min": min(timed),
            "step_s_max": max(timed), "step_cpu_s_median": statistics.median(cpu_times[WARMUP:]),
            "build_s": build_s,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_at_start_bytes": start_rss, "weight_bytes": weight_buckets(model),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return 0
    load_before = load_average()
    # (model, allocator, rounds): LoRA and QLoRA alternate, so load changes hit both alike
    plan = [("minigpt", "glibc-default", 3), ("gpt2-small", "glibc-default", 2),
            ("gpt2-small", "fixed-mmap-threshold", 1)]
    rows, comparisons = [], []
    for model, allocator, rounds in plan:
        runs = {"lora": [], "qlora": []}
        for _ in range(rounds):
            for method in runs:
                row = run_json_child([__file__, "--child", model, method, "--threads",
                                      args.threads], env=ALLOCATORS[allocator])
                row["allocator"] = allocator
                rows.append(row)
                runs[method].append(row)
                print(f"done {model} {method} {allocator}", file=sys.stderr, flush=True)

        def median_of(method, key, runs=runs):
            return statistics.median(r[key] for r in runs[method])

        comparisons.append({
            "model": model, "allocator": allocator, "rounds": rounds,
            "step_s_median": {m: median_of(m, "step_s_median") for m in runs},
            "peak_rss_bytes_median": {m: median_of(m, "peak_rss_bytes") for m in runs},
            "step_cpu_ratio_qlora_to_lora": median_of("qlora", "step_cpu_s_median")
            / median_of("lora", "step_cpu_s_median"),
            "step_ratio_qlora_to_lora": median_of("qlora", "step_s_median")
            / median_of("lora", "step_s_median"),
            "peak_rss_ratio_qlora_to_lora": median_of("qlora", "peak_rss_bytes")
            / median_of("lora", "peak_rss_bytes"),
        })
    for c in comparisons:
        c["step_goal_met"] = c["step_ratio_qlora_to_lora"] <= 1.3
        if c["model"] == "gpt2-small":
            c["rss_goal_met"] = c["peak_rss_ratio_qlora_to_lora"] <= 0.8
    write_results(args.out, {
        "benchmark": "minituner QLoRA vs LoRA, fp32 compute, r = 8",
        "threads": args.threads, "warmup_steps": WARMUP, "rows": rows,
        "comparisons": comparisons, "load_average_before": load_before,
    })
    print("| model | allocator | method | step s (median, min-max) | peak RSS MB "
          "| trainable MB | frozen float MB | NF4 MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["weight_bytes"]
        print(f"| {r['model']} | {r['allocator']} | {r['method']} | {r['step_s_median']:.3f} "
              f"({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | {r['peak_rss_bytes'] / 1e6:,.0f} "
              f"| {w['trainable'] / 1e6:.2f} | {w['frozen_float'] / 1e6:.1f} "
              f"| {w['nf4_layers'] / 1e6:.1f} |")
    print()
    for c in comparisons:
        print(f"{c['model']} ({c['allocator']}, {c['rounds']} rounds): QLoRA/LoRA step "
              f"{c['step_ratio_qlora_to_lora']:.2f} "
              f"(CPU time {c['step_cpu_ratio_qlora_to_lora']:.2f}), "
              f"peak RSS {c['peak_rss_ratio_qlora_to_lora']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
