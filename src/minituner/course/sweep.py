"""The rank sweep: the same data, steps and seed at every rank; rank 0 is the untouched base.

``sweep.json`` holds one list per metric, aligned with ``ranks``, and the elbow: the smallest
trained rank whose irregular accuracy is within ``ELBOW_TOLERANCE`` (1 point) of the best
accuracy of the sweep; past it, more rank buys less than a point.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from minituner.course import stats as S
from minituner.course.data import control_texts
from minituner.course.evaluate import evaluate_model, load_builtin_probes
from minituner.course.finetune import control_records, load_base, run_with_progress
from minituner.util.files import atomic_write_json
from minituner.util.plots import plot_sweep

ELBOW_TOLERANCE = 0.01
ELBOW_RULE = ("smallest trained rank r >= 1 whose irregular accuracy is within 1 point (0.01) "
              "of the best irregular accuracy of the sweep")
ELBOW_RULE_SEEDS = ("smallest trained rank r >= 1 whose 95% t-interval of the mean irregular "
                    "accuracy over seeds reaches within 1 point (0.01) of the best rank's mean "
                    "(upper end >= best mean - 0.01): a rank the seeds cannot tell from the "
                    "best")
DEFAULT_RANKS = (0, 2, 4, 8, 16, 32)


def parse_ranks(text: str) -> list:
    """'0,2,4' -> [0, 2, 4]: distinct non-negative ints, in the given order."""
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ranks must be comma-separated integers, got {text!r}") from None
    if not ranks or any(r < 0 for r in ranks) or len(set(ranks)) != len(ranks):
        raise ValueError(f"--ranks must be distinct non-negative integers, got {text!r}")
    return ranks


def elbow_rank(ranks: list, accuracy: list, tolerance: float = ELBOW_TOLERANCE,
               upper: list | None = None) -> int | None:
    """The elbow by :data:`ELBOW_RULE`, or with ``upper`` (each rank's upper 95% interval end)
    by :data:`ELBOW_RULE_SEEDS` (None when no rank >= 1 was trained)."""
    upper = upper or accuracy
    trained = [(r, a, u) for r, a, u in zip(ranks, accuracy, upper, strict=True) if r > 0]
    if not trained:
        return None
    best = max(a for _, a, _ in trained)
    return min(r for r, _, u in trained if u >= best - tolerance - 1e-12)


def seeded_sweep(ranks: list, runs: dict, base: dict | None, cfg) -> dict:
    """sweep.json's content from {rank: [(run folder, results) per seed]}: per-rank means (the
    lists), every metric's seed summary and interval, and the elbow by the interval rule."""
    metrics = {"irregular_accuracy": "irregular_accuracy_tuned",
               "regular_accuracy": "regular_accuracy_tuned", "control_ppl": "control_ppl_tuned"}
    stats = {}
    for rank in ranks:
        if rank == 0:
            stats["0"] = {m: S.summarise([base[m]]) for m in metrics}
            continue
        stats[str(rank)] = {m: S.summarise([res[k] for _, res in runs[rank]])
                            for m, k in metrics.items()}
    means = {m: [stats[str(r)][m]["mean"] for r in ranks] for m in metrics}
    upper = [(stats[str(r)]["irregular_accuracy"]["ci95"] or [0, stats[str(r)][
        "irregular_accuracy"]["mean"]])[1] for r in ranks]
    params = [0 if r == 0 else runs[r][0][1]["trainable_params"] for r in ranks]
    summary = {"ranks": list(ranks), **means, "trainable_params": params,
               "elbow_rank": elbow_rank(ranks, means["irregular_accuracy"], upper=upper),
               "elbow_rule": ELBOW_RULE_SEEDS, "stats": stats, "interval_note": S.INTERVAL_NOTE,
               "seeds": sorted({res["seed"] for runs_ in runs.values() for _, res in runs_}),
               "config": {k: v for k, v in cfg.to_dict().items() if k not in ("rank", "seed")},
               "runs": {str(r): [folder for folder, _ in runs.get(r, [])] for r in ranks}}
    if base is not None:
        summary["control_ppl_change"] = [p / base["control_ppl"] - 1.0
                                         for p in means["control_ppl"]]
    return summary


def write_seeded_sweep(base_dir, out_dir, ranks: list, runs: dict, cfg, wall_s: float) -> dict:
    """Write sweep.json and sweep.png (with 95% interval error bars) of a seeded sweep."""
    out = Path(out_dir)
    base = base_point(base_dir) if 0 in ranks else None
    summary = seeded_sweep(ranks, runs, base, cfg)
    summary["wall_s"] = wall_s
    atomic_write_json(out / "sweep.json", summary)
    plot_sweep(summary, out / "sweep.png")
    return summary


def base_point(base_dir) -> dict:
    """Rank 0: the base's own evaluation (no adapter, nothing trained)."""
    model, tokenizer, _ = load_base(base_dir)
    texts = control_texts(control_records(base_dir))
    result = evaluate_model(model, tokenizer, load_builtin_probes(), texts)
    return {"rank": 0, "irregular_accuracy": result["irregular_accuracy"],
            "regular_accuracy": result["regular_accuracy"], "control_ppl": result["control_ppl"],
            "trainable_params": 0}


def run_sweep(base_dir, out_dir, ranks, cfg, on_run=None, progress=None) -> dict:
    """Fine-tune one LoRA (or QLoRA) run per rank into ``out_dir/r<rank>``; write sweep.json
    and sweep.png. ``on_run(rank, point)`` reports each finished rank; ``progress`` (optional)
    is an object with ``start(total)``, ``on_step(record)`` and ``close()``."""
    started = time.perf_counter()
    out = Path(out_dir)
    points = []
    for rank in ranks:
        if rank == 0:
            point = base_point(base_dir)
        else:
            run_cfg = dataclasses.replace(cfg, rank=rank)
            results = run_with_progress(base_dir, out / f"r{rank}", run_cfg, progress,
                                        overwrite=True)
            point = {"rank": rank, "irregular_accuracy": results["irregular_accuracy_tuned"],
                     "regular_accuracy": results["regular_accuracy_tuned"],
                     "control_ppl": results["control_ppl_tuned"],
                     "trainable_params": results["trainable_params"],
                     "run": f"r{rank}"}
        points.append(point)
        if on_run is not None:
            on_run(rank, point)
    summary = summarise(points, cfg)
    summary["wall_s"] = time.perf_counter() - started
    atomic_write_json(out / "sweep.json", summary)
    plot_sweep(summary, out / "sweep.png")
    return summary


def summarise(points: list, cfg) -> dict:
    """sweep.json's content from the per-rank points."""
    ranks = [p["rank"] for p in points]
    accuracy = [p["irregular_accuracy"] for p in points]
    base = next((p for p in points if p["rank"] == 0), None)
    summary = {
        "ranks": ranks,
        "irregular_accuracy": accuracy,
        "regular_accuracy": [p["regular_accuracy"] for p in points],
        "control_ppl": [p["control_ppl"] for p in points],
        "trainable_params": [p["trainable_params"] for p in points],
        "elbow_rank": elbow_rank(ranks, accuracy),
        "elbow_rule": ELBOW_RULE,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "rank"},
        "runs": {str(p["rank"]): p.get("run") for p in points},
    }
    if base is not None:
        summary["control_ppl_change"] = [p["control_ppl"] / base["control_ppl"] - 1.0
                                         for p in points]
    return summary
