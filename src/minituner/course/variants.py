"""The adapter-variant table: plain LoRA, DoRA, PiSSA, LoRA+ and, on an NF4 base, plain QLoRA
and LoftQ, each a named change of the experiment's chosen r = 8 LoRA config (same lr, steps,
data, replay and KL), each run with seeds 0, 1 and 2.

Per variant, ``variants.json`` holds every seed's irregular accuracy, regular accuracy, control
perplexity and its change against the base, and their mean and sample standard deviation (n - 1)
over the seeds, with the trainable parameters. LoftQ runs 5 alternations (``loftq:5``): on the
pretrained demo base the step-0 logit gap stops shrinking after about 5 (30.7% cut at 5, at most
32.1% at 6-10; README, "PiSSA, LoftQ and LoRA+"), so more iterations cost time and buy nothing.

Folder layout under ``out_dir``: ``<variant>/seed<s>/`` (one fine-tuning run each, unless an
identical run is reused: the experiment's lora-r8 and seeds/ runs are the plain-LoRA rows),
``variants.json`` and ``variants.png``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from minituner.course.finetune import run_with_progress
from minituner.training.config import FinetuneConfig
from minituner.util.files import atomic_write_json, read_json
from minituner.util.plots import plot_variants

LOFTQ_INIT = "loftq:5"
LORAPLUS_RATIO = 16.0  # the LoRA+ paper's default
VARIANTS = {  # name -> the FinetuneConfig changes of the chosen r = 8 LoRA config
    "lora": {},
    "dora": {"method": "dora"},
    "pissa": {"init": "pissa"},
    "loraplus": {"loraplus_lr_ratio": LORAPLUS_RATIO},
    "qlora": {"method": "qlora"},
    "loftq": {"method": "qlora", "init": LOFTQ_INIT},
}
LABELS = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "loraplus": "LoRA+ (K = 16)",
          "qlora": "QLoRA (NF4)", "loftq": "QLoRA + LoftQ (5 iters)"}
DEFAULT_SEEDS = (0, 1, 2)
METRICS = {  # summary name -> results.json key
    "irregular_accuracy": "irregular_accuracy_tuned",
    "regular_accuracy": "regular_accuracy_tuned",
    "control_ppl": "control_ppl_tuned",
    "control_ppl_change": "control_ppl_change",
}
SPREAD_RULE = ("a variant's mean differs from LoRA's beyond the seed spread when |mean - "
               "mean_lora| > std + std_lora (sample standard deviations over the seeds)")


def variant_config(cfg: FinetuneConfig, name: str, seed: int) -> FinetuneConfig:
    """The config of variant ``name`` with ``seed``: ``cfg`` (plain LoRA) plus the variant's
    changes."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {name!r}")
    return dataclasses.replace(cfg, **VARIANTS[name], seed=seed)


def mean_std(values: list) -> tuple:
    """(mean, sample standard deviation with n - 1) of ``values``; std is None below 2 values."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _same_run(run_dir: Path, cfg: FinetuneConfig) -> bool:
    """True when ``run_dir`` is a finished run of exactly ``cfg`` (threads aside)."""
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.json").is_file():
        return False
    saved = read_json(run_dir / "config.json", "run config").get("finetune") or {}
    try:
        return FinetuneConfig.from_dict(saved).resume_identity() == cfg.resume_identity()
    except ValueError:
        return False


def run_variants(base_dir, out_dir, cfg: FinetuneConfig, seeds=DEFAULT_SEEDS, names=None,
                 reuse: dict | None = None, progress=None, on_run=None) -> dict:
    """Fine-tune every variant (default: all of :data:`VARIANTS`) with every seed into
    ``out_dir/<variant>/seed<s>``; write variants.json and variants.png; return the summary.

    ``reuse`` maps (variant, seed) to an existing run folder that is used instead of a new run
    when its config is the same; ``on_run(name, results)`` reports each run, ``progress`` is
    a :class:`minituner.course.finetune.ProgressSink`.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    reuse = reuse or {}
    names = list(names or VARIANTS)
    rows = {}
    for name in names:
        rows[name] = {}
        for seed in seeds:
            run_cfg = variant_config(cfg, name, seed)
            existing = reuse.get((name, seed))
            if existing is not None and _same_run(Path(existing), run_cfg):
                run_dir = Path(existing)
                results = read_json(run_dir / "results.json", "run results")
            else:
                run_dir = out / name / f"seed{seed}"
                results = run_with_progress(base_dir, run_dir, run_cfg, progress,
                                            overwrite=True)
                if on_run is not None:
                    on_run(f"variants/{name}/seed{seed}", results)
            rows[name][seed] = (os.path.relpath(run_dir, out), results)
    summary = summarise(rows, cfg)
    summary["wall_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "variants.json", summary)
    plot_variants(summary, out / "variants.png")
    return summary


def write_variants(out_dir, rows: dict, cfg: FinetuneConfig, wall_s: float) -> dict:
    """Write variants.json and variants.png from {variant: {seed: (run folder, results)}}
    (folders relative to the experiment are made relative to ``out_dir``)."""
    out = Path(out_dir)
    rows = {name: {seed: (os.path.relpath(out.parent / folder, out), res)
                   for seed, (folder, res) in by_seed.items()} for name, by_seed in rows.items()}
    summary = summarise(rows, cfg)
    summary["wall_s"] = wall_s
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "variants.json", summary)
    plot_variants(summary, out / "variants.png")
    return summary


def summarise(rows: dict, cfg: FinetuneConfig) -> dict:
    """variants.json's content from {variant: {seed: (run folder, results)}}."""
    variants = {}
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        results = [by_seed[s][1] for s in seeds]
        entry = {"label": LABELS.get(name, name), "changes": VARIANTS.get(name, {}),
                 "seeds": seeds, "runs": [by_seed[s][0] for s in seeds],
                 "trainable_params": results[0]["trainable_params"]}
        for metric, key in METRICS.items():
            values = [res[key] for res in results]
            mean, std = mean_std(values)
            entry[metric] = {"values": values, "mean": mean, "std": std}
        variants[name] = entry
    first = next(iter(next(iter(rows.values())).values()))[1] if rows else {}
    summary = {
        "variants": variants,
        "order": list(variants),  # the table's row order (JSON files sort their keys)
        "base": {"irregular_accuracy": first.get("irregular_accuracy_base"),
                 "regular_accuracy": first.get("regular_accuracy_base"),
                 "control_ppl": first.get("control_ppl_base")},
        "config": {k: v for k, v in cfg.to_dict().items() if k != "seed"},
        "std_note": "sample standard deviation over the seeds (n - 1)",
        "spread_rule": SPREAD_RULE,
    }
    if "lora" in variants:
        summary["vs_lora"] = {name: vs_reference(entry, variants["lora"])
                              for name, entry in variants.items() if name != "lora"}
    return summary


def vs_reference(entry: dict, reference: dict) -> dict:
    """Per metric: the difference of the means and whether it lies beyond the seed spread
    (:data:`SPREAD_RULE`; None when a standard deviation is missing)."""
    compared = {}
    for metric in METRICS:
        a, b = entry[metric], reference[metric]
        delta = a["mean"] - b["mean"]
        beyond = (None if a["std"] is None or b["std"] is None
                  else abs(delta) > a["std"] + b["std"])
        compared[metric] = {"delta": delta, "beyond_seed_spread": beyond}
    return compared
