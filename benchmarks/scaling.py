"""How step time and peak memory of full fine-tuning, LoRA and QLoRA grow with width and length.

Model: Mini-GPT (minituner.models.minigpt), 4 layers, head width 64, d_ff = 4 d_model, a 2,048-token
vocabulary and a tied head. Two sweeps:

- width: d_model 64, 128, 256, 512, 1024 at batch 4 x 128 tokens;
- length: sequence 64 .. 1024 at d_model 256, batch 4.

LoRA and QLoRA use r = 8 (alpha 16) on all six Linears of each block; QLoRA's block Linears are
NF4 with double quantization; AdamW lr 1e-4; fp32 compute. Each point runs in its own process:
it imports, warms up torch on a tiny model, records its resident memory, then builds the model
and trains 2 warm-up + N timed steps. Step time is the median of the timed steps (min-max
kept); memory is the peak RSS growth over the recorded baseline (model + optimizer +
activations, without the fixed cost of the imports).

One torch thread by default, and time is the process's CPU time per step (wall time is kept
too): on a machine shared with other jobs, wall time measures how often the process got a
core, while the CPU time of a single-threaded process is the work it did. Slopes, the plot and
the "LoRA pays off" points use CPU time.

Slopes are least-squares fits of log(value) against log(d_model) or log(seq). The plot
(log-log axes) is written to benchmarks/results/scaling.png.

    .venv/bin/python benchmarks/scaling.py            # both sweeps, 3 timed steps (~4 min)
    .venv/bin/python benchmarks/scaling.py --quick    # fewer points, 3 timed steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from bench_common import (
    load_average,
    run_json_child,
    vm_hwm_bytes,
    vm_rss_bytes,
    write_results,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.json"
PLOT = HERE / "results" / "scaling.png"
METHODS = ("full", "lora", "qlora")
LAYERS, VOCAB, HEAD_DIM, RANK = 4, 2048, 64, 8
WIDTHS, WIDTH_SEQ, BATCH = (64, 128, 256, 512, 1024), 128, 4
SEQS, SEQ_WIDTH = (64, 128, 256, 512, 1024), 256
WARMUP = 2
TIME_KEY = "step_cpu_s_median"  # slopes and comparisons use CPU time (see the docstring)


def _warm_up() -> None:
    """Run every kernel once on tiny tensors, so one-off costs land before the baseline."""
    run_point("qlora", 64, 16, steps=1, warmup=0, measure=False)
    run_point("full", 64, 16, steps=1, warmup=0, measure=False)


def build(method: str, d_model: int, seq: int):
    """A seeded Mini-GPT of this width and context, wrapped for ``method``."""
    import torch

    from minituner.lora import wrap_minigpt_with_lora
    from minituner.models.minigpt import MiniGPT, MiniGPTConfig
    from minituner.quant.qlora import wrap_minigpt_qlora

    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=VOCAB, context_len=seq, d_model=d_model,
                           n_heads=max(1, d_model // HEAD_DIM), n_layers=LAYERS,
                           d_ff=4 * d_model)
    model = MiniGPT(config)
    if method == "lora":
        wrap_minigpt_with_lora(model, r=RANK, alpha=16.0, seed=0)
    elif method == "qlora":
        wrap_minigpt_qlora(model, r=RANK, alpha=16.0, seed=0)
    return model


def run_point(method: str, d_model: int, seq: int, steps: int, warmup: int = WARMUP,
              measure: bool = True) -> dict:
    """Build and train one configuration; step times and the peak RSS growth."""
    import gc

    import torch

    gc.collect()
    baseline = vm_rss_bytes()
    model = build(method, d_model, seq)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for _ in range(warmup + steps):
        data = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=generator)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
        cpu_times.append(time.process_time() - begin_cpu)
    if not measure:
        return {}
    timed, timed_cpu = times[warmup:], cpu_times[warmup:]
    return {"method": method, "d_model": d_model, "seq": seq, "batch": BATCH,
            "layers": LAYERS, "vocab": VOCAB, "timed_steps": steps,
            "step_s_median": statistics.median(timed), "step_s_min": min(timed),
            "step_s_max": max(timed), "step_cpu_s_median": statistics.median(timed_cpu),
            "step_cpu_s_min": min(timed_cpu), "step_cpu_s_max": max(timed_cpu),
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": vm_hwm_bytes(), "peak_growth_bytes": vm_hwm_bytes() - baseline,
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters())}


def child(method: str, d_model: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    _warm_up()
    return {**run_point(method, d_model, seq, steps), "threads": threads}


def slope(xs: list, ys: list) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den


def from_on(sizes: list, winning: list):
    """The smallest size from which every larger measured size is in ``winning`` (or None)."""
    start = None
    for size in sorted(sizes, reverse=True):
        if size not in winning:
            break
        start = size
    return start


def summarize(rows: list, sweep: str, key: str) -> dict:
    """Slopes per method (all points and the upper half), and where LoRA first beats full FT."""
    out = {"sweep": sweep, "x": key, "slopes": {}, "lora_pays_off": {}}
    by_method = {m: sorted((r for r in rows if r["sweep"] == sweep and r["method"] == m),
                           key=lambda r: r[key]) for m in METHODS}
    for method, points in by_method.items():
        xs = [p[key] for p in points]
        upper = [p for p in points if p[key] >= xs[len(xs) // 2]] if xs else []
        out["slopes"][method] = {
            "step_time_all": slope(xs, [p[TIME_KEY] for p in points]),
            "step_time_upper": slope([p[key] for p in upper], [p[TIME_KEY] for p in upper]),
            "peak_growth_all": slope(xs, [p["peak_growth_bytes"] for p in points]),
            "peak_growth_upper": slope([p[key] for p in upper],
                                       [p["peak_growth_bytes"] for p in upper]),
        }
    full = {p[key]: p for p in by_method["full"]}
    for method in ("lora", "qlora"):
        faster = [p[key] for p in by_method[method]
                  if p[key] in full and p[TIME_KEY] < full[p[key]][TIME_KEY]]
        smaller = [p[key] for p in by_method[method]
                   if p[key] in full and p["peak_growth_bytes"] < full[p[key]]["peak_growth_bytes"]]
        sizes = [p[key] for p in by_method[method] if p[key] in full]
        out["lora_pays_off"][method] = {"faster_than_full_from": from_on(sizes, faster),
                                        "faster_at": faster,
                                        "less_memory_than_full_from": from_on(sizes, smaller),
                                        "less_memory_at": smaller}
    return out


def plot(rows: list, path: Path) -> None:
    """Four log-log panels: time and memory against width and against sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minituner.util.files import atomic_write

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    panels = [("width", "d_model", TIME_KEY, "step CPU time (s)"),
              ("width", "d_model", "peak_growth_bytes", "peak RSS growth (MB)"),
              ("seq", "seq", TIME_KEY, "step CPU time (s)"),
              ("seq", "seq", "peak_growth_bytes", "peak RSS growth (MB)")]
    for ax, (sweep, key, value, label) in zip(axes.flat, panels, strict=True):
        for method, marker in zip(METHODS, "osd", strict=True):
            points = sorted((r for r in rows if r["sweep"] == sweep and r["method"] == method),
                            key=lambda r: r[key])
            ys = [p[value] / (1e6 if "bytes" in value else 1) for p in points]
            ax.plot([p[key] for p in points], ys, marker=marker, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key + (f" (seq {WIDTH_SEQ})" if sweep == "width" else
                             f" (d_model {SEQ_WIDTH})"))
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Mini-GPT, {LAYERS} layers, batch {BATCH}, r = {RANK}, "
                 f"{rows[0]['threads']} thread(s): full FT vs LoRA vs QLoRA (log-log)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def markdown(rows: list, summaries: list) -> str:
    """Tables of the points, then the fitted slopes and crossovers."""
    return rows_markdown(rows) + "\n\n" + summary_markdown(summaries)


def rows_markdown(rows: list) -> str:
    """One table row per measured point."""
    lines = ["| sweep | d_model | seq | method | step CPU ms (median, min-max) "
             "| step wall ms (median) | peak RSS growth MB | trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['d_model']} | {r['seq']} | {r['method']} "
                     f"| {r['step_cpu_s_median'] * 1e3:.1f} ({r['step_cpu_s_min'] * 1e3:.1f}-"
                     f"{r['step_cpu_s_max'] * 1e3:.1f}) | {r['step_s_median'] * 1e3:.1f} "
                     f"| {r['peak_growth_bytes'] / 1e6:.1f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def summary_markdown(summaries: list) -> str:
    """The log-log slopes per method and where LoRA / QLoRA beat full fine-tuning."""
    lines = ["| sweep | method | time slope (all / upper half) | memory slope "
             "(all / upper half) |", "|---|---|---|---|"]

    def fmt(value):
        return "n/a" if value is None else f"{value:.2f}"

    for s in summaries:
        for method, sl in s["slopes"].items():
            lines.append(f"| {s['sweep']} | {method} | {fmt(sl['step_time_all'])} / "
                         f"{fmt(sl['step_time_upper'])} | {fmt(sl['peak_growth_all'])} / "
                         f"{fmt(sl['peak_growth_upper'])} |")
    lines += ["", "| sweep | method | faster than full FT from (at) | less memory than full FT "
              "from (at) |", "|---|---|---|---|"]
    for s in summaries:
        for method, pay in s["lora_pays_off"].items():
            lines.append(f"| {s['sweep']} | {method} | {pay['faster_than_full_from'] or 'never'} "
                         f"({pay['faster_at'] or 'none'}) "
                         f"| {pay['less_memory_than_full_from'] or 'never'} "
                         f"({pay['less_memory_at'] or 'none'}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "D_MODEL", "SEQ"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time is then the work done)")
    parser.add_argument("--quick", action="store_true", help="3 sizes per sweep, 3 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    if args.child:
        method, d_model, seq = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(method, d_model, seq, args.steps, args.threads)))
        return 0
    steps = 3 if args.quick else args.steps
    widths = WIDTHS[::2] if args.quick else WIDTHS
    seqs = SEQS[::2] if args.quick else SEQS
    points = [("width", d, WIDTH_SEQ) for d in widths] + [("seq", SEQ_WIDTH, s) for s in seqs]
    load_before, started = load_average(), time.perf_counter()
    rows = []
    for sweep, d_model, seq in points:
        for method in METHODS:
            row = run_json_child([__file__, "--child", method, d_model, seq, "--steps", steps,
                                  "--threads", args.threads])
            rows.append({"sweep": sweep, **row})
            print(f"done {sweep} d={d_model} seq={seq} {method}: "
                  f"{row['step_s_median'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    summaries = [summarize(rows, "width", "d_model"), summarize(rows, "seq", "seq")]
    plot(rows, args.plot)
    table = markdown(rows, summaries)
    write_results(args.out, {
        "benchmark": "Mini-GPT scaling: full FT vs LoRA vs QLoRA, width and sequence sweeps",
        "threads": args.threads, "warmup_steps": WARMUP, "rows": rows,
        "summaries": summaries, "plot": str(args.plot.relative_to(HERE.parent))
        if args.plot.is_relative_to(HERE.parent) else str(args.plot),
        "markdown": table, "load_average_before": load_before,
        "wall_s": time.perf_counter() - started,
    })
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
