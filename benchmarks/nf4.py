"""NF4 quantize / dequantize speed: minituner vs bitsandbytes vs torchao, one process.

Each timing is the median of 5 runs (3 at 8192 x 8192; min and max kept); the libraries take
turns within every run, so load changes on a shared machine hit them alike. Each size and dtype
gets its own copy floor (a clone of the input, timed in the same turns): the cost of just
writing a dequantized matrix that size; every dequantize time is reported as a multiple of it,
and the 4096 x 4096 fp32 one (a 64 MB tensor) heads the table. Goals, per size and dtype:
minituner quantizes no slower than bitsandbytes (ratio <= 1.0) and dequantizes within 1.5x of
it. minituner's dequantization is timed both into a fresh tensor (as the others) and into a
reused buffer (``out=``, what QuantizedLinear does). Writes benchmarks/results/nf4.json and
prints a markdown table.

    .venv/bin/python benchmarks/nf4.py            # sizes 64^2 .. 8192^2, fp32 and bf16
    .venv/bin/python benchmarks/nf4.py --quick    # sizes up to 4096^2
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_common import load_average, median_spread, write_results

from minituner.quant.nf4 import dequantize_nf4, quantize_nf4

RESULTS = Path(__file__).resolve().parent / "results" / "nf4.json"
REPEATS = 5
LARGE_SIDE, LARGE_REPEATS = 8192, 3  # 8192^2 takes seconds per call in torchao: 3 timed rounds
GOALS = {"quantize": 1.0, "dequantize": 1.5}  # minituner / bitsandbytes, at most


def libraries():
    """(name, quantize(w), dequantize(q, w), minimum numel multiple) for each library."""
    import bitsandbytes.functional as bnbF
    from torchao.quantization import to_nf4

    def bnb_quantize(w):
        return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    def bnb_dequantize(q, w):
        return bnbF.dequantize_4bit(q[0], q[1])

    return [
        ("minituner", quantize_nf4, lambda q, w: dequantize_nf4(q), 1),
        ("bitsandbytes", bnb_quantize, bnb_dequantize, 1),
        ("torchao", lambda w: to_nf4(w, 64, 256), lambda q, w: q.get_original_weight(), 64 * 256),
    ]


def operations(name: str, quantize, dequantize, w: torch.Tensor) -> dict:
    """The timed operations of one library on ``w``, and its dequantization error."""
    q = quantize(w)
    ops = {"quantize": lambda: quantize(w), "dequantize": lambda: dequantize(q, w)}
    if name == "minituner":
        out = torch.empty_like(w)
        ops["dequantize_into_buffer"] = lambda: dequantize_nf4(q, out=out)
    error = (dequantize(q, w).float() - w.float()).abs().mean().item()
    return {"ops": ops, "mean_abs_error": error}


def bench_size(side: int, dtype: torch.dtype, libs) -> list:
    """Rows for one square size and dtype; libraries take turns within every repetition, so a
    change in machine load hits them alike."""
    w = (torch.randn(side, side, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    rows, prepared = [], {}
    for name, quantize, dequantize, multiple in libs:
        row = {"library": name, "shape": [side, side], "dtype": str(dtype).removeprefix("torch.")}
        if w.numel() % multiple:
            row["skipped"] = f"needs numel divisible by {multiple}"
        else:
            prepared[name] = operations(name, quantize, dequantize, w)
            row["mean_abs_error"] = prepared[name]["mean_abs_error"]
        rows.append(row)
    prepared["copy"] = {"ops": {"clone": w.clone}}  # this size's copy floor, in the same turns
    times = {(name, op): [] for name, p in prepared.items() for op in p["ops"]}
    repeats = LARGE_REPEATS if side >= LARGE_SIDE else REPEATS
    for repeat in range(repeats + 1):  # the first round warms up
        for (name, op), samples in times.items():
            start = time.perf_counter()
            prepared[name]["ops"][op]()
            if repeat:
                samples.append((time.perf_counter() - start) * 1000)
    floor = median_spread(times[("copy", "clone")], "ms")
    for row in rows:
        row["repeats"] = repeats
        for (name, op), samples in times.items():
            if name == row["library"]:
                row[op] = median_spread(samples, "ms")
        if "dequantize" in row:
            row["copy_floor"] = floor
            row["dequantize_over_copy_floor"] = row["dequantize"]["median_ms"] / floor["median_ms"]
    return rows


def add_ratios(rows: list) -> None:
    """minituner / bitsandbytes time ratios, per shape and dtype."""
    by_key = {(tuple(r["shape"]), r["dtype"], r["library"]): r for r in rows if "quantize" in r}
    for (shape, dtype, library), row in by_key.items():
        bnb = by_key.get((shape, dtype, "bitsandbytes"))
        if library != "minituner" or bnb is None:
            continue
        row["ratio_vs_bitsandbytes"] = {
            op: row[op]["median_ms"] / bnb[op]["median_ms"] for op in ("quantize", "dequantize")
        }
        row["ratio_vs_bitsandbytes"]["dequantize_into_buffer"] = (
            row["dequantize_into_buffer"]["median_ms"] / bnb["dequantize"]["median_ms"])
        row["goals_met"] = {op: row["ratio_vs_bitsandbytes"][op] <= limit
                            for op, limit in GOALS.items()}
        row["goals_met"]["dequantize_into_buffer"] = (
            row["ratio_vs_bitsandbytes"]["dequantize_into_buffer"] <= GOALS["dequantize"])


def goal_summary(rows: list) -> dict:
    """For each goal: sizes met, sizes not met, and the worst ratio."""
    ours = [r for r in rows if r["library"] == "minituner" and "goals_met" in r]
    out = {}
    for op in ("quantize", "dequantize", "dequantize_into_buffer"):
        limit = GOALS["quantize" if op == "quantize" else "dequantize"]
        ratios = {f"{'x'.join(map(str, r['shape']))} {r['dtype']}": r["ratio_vs_bitsandbytes"][op]
                  for r in ours}
        out[op] = {"goal_at_most": limit, "ratios": ratios,
                   "met": sorted(k for k, v in ratios.items() if v <= limit),
                   "not_met": sorted(k for k, v in ratios.items() if v > limit),
                   "worst_ratio": max(ratios.values(), default=None)}
    return out


def markdown(rows: list, floor: dict) -> str:
    """A markdown table of the rows."""
    lines = [f"copy floor (clone of a 64 MB fp32 tensor): {floor['median_ms']:.1f} ms "
             f"(min {floor['min_ms']:.1f}, max {floor['max_ms']:.1f}); "
             f"threads: {torch.get_num_threads()}",
             "",
             "| shape | dtype | library | mean abs error | quantize ms (min-max) "
             "| dequantize ms (min-max) | into buffer ms | vs bnb q / dq / buffer "
             "| dq / copy floor |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(t):
        return f"{t['median_ms']:.1f} ({t['min_ms']:.1f}-{t['max_ms']:.1f})"

    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "skipped" in r:
            lines.append(f"| {shape} | {r['dtype']} | {r['library']} | {r['skipped']} "
                         "| | | | | |")
            continue
        buffer = cell(r["dequantize_into_buffer"]) if "dequantize_into_buffer" in r else ""
        ratio = r.get("ratio_vs_bitsandbytes")
        ratio_text = (f"{ratio['quantize']:.2f} / {ratio['dequantize']:.2f} / "
                      f"{ratio['dequantize_into_buffer']:.2f}") if ratio else ""
        lines.append(f"| {shape} | {r['dtype']} | {r['library']} | {r['mean_abs_error']:.4e} "
                     f"| {cell(r['quantize'])} | {cell(r['dequantize'])} | {buffer} "
                     f"| {ratio_text} | {r.get('dequantize_over_copy_floor', float('nan')):.1f} |")
    return "\n".join(lines)


def goal_lines(summary: dict) -> str:
    """One line per goal: where it is met and the worst measured ratio."""
    lines = ["", "| goal (minituner / bitsandbytes) | met at | not met at | worst ratio |",
             "|---|---|---|---|"]
    for op, g in summary.items():
        lines.append(f"| {op} <= {g['goal_at_most']} | {', '.join(g['met']) or 'none'} "
                     f"| {', '.join(g['not_met']) or 'none'} | {g['worst_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 4096 x 4096 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = load_average()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sizes = [64, 256, 1024, 4096] + ([] if args.quick else [8192])
    libs = libraries()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for side in sizes:
            rows.extend(bench_size(side, dtype, libs))
            print(f"done {side}x{side} {dtype}", file=sys.stderr, flush=True)
    add_ratios(rows)
    floor = next(r["copy_floor"] for r in rows  # the 64 MB floor: 4096 x 4096 fp32's own
                 if r["shape"] == [4096, 4096] and r["dtype"] == "float32" and "copy_floor" in r)
    summary = goal_summary(rows)
    table = markdown(rows, floor) + "\n" + goal_lines(summary)
    write_results(args.out, {
        "benchmark": "nf4 quantize/dequantize, blocksize 64, double quantization",
        "repeats": REPEATS, "threads": args.threads, "copy_floor_64MB": floor, "rows": rows,
        "goals": summary, "markdown": table, "load_average_before": load_before,
    })
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
