"""The whole phase-28 experiment in one call: learning-rate search for LoRA r = 8 and full
fine-tuning, then every other run on worker processes: LoRA r = 8, full fine-tuning, QLoRA and
every sweep rank with 5 seeds, the anti-forgetting ablation and the method variants with 3
seeds, frame cross-validation, and (``--full``) the adapter-variant table; then the report and
the results file the quiz reads (docs/results/phase-28.json).

Folder layout under ``out``: base/ (unless --base is given), lrsearch/{lora,full}-lr<lr>/,
lora-r8/ and full-ft/ (copies of the chosen learning rate's seed-0 runs), seeds/seed<s>/ and
full-seeds/seed<s>/ (the same runs with the other seeds), qlora-r8/ and qlora-seeds/seed<s>/
(one epoch, :data:`QLORA_SETTING`), sweep/r<rank>/ and sweep/r<rank>-seed<s>/ (r = 8 is the
lora-r8 and seeds/ runs) + sweep.json + sweep.png, ablation/<name>/ and ablation/<name>-seed<s>/
("both" is the lora-r8 and seeds/ runs), methods/<name>/seed<s>/ (:data:`METHODS`),
framecv/fold<k>-seed<s>/ (:func:`minituner.course.data.fold_frames`), variants/ (the
adapter-variant table of :mod:`minituner.course.variants`, when its seeds are given),
experiment.json and REPORT.md. Every number in the report and the results file is read back
from these files. Results do not depend on the number of workers: each run is seeded on its
own and the summaries read the runs in a fixed order (only wall times differ).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from minituner.course.data import fold_frames
from minituner.course.evaluate import REGULAR_SLICE, SLICE_GROUPS
from minituner.course.finetune import DEFAULT_STEPS
from minituner.course.parallel import Job, run_jobs
from minituner.course.pretraining import run_pretraining
from minituner.course.report import write_report
from minituner.course.stats import INTERVAL_NOTE, summarise
from minituner.course.sweep import DEFAULT_RANKS, write_seeded_sweep
from minituner.course.variants import VARIANTS, variant_config, write_variants
from minituner.training.config import PretrainConfig
from minituner.util.files import atomic_write_bytes, atomic_write_json, read_json

DEFAULT_LR_GRID = (1e-3, 3e-3, 1e-2)
REPEAT_SEEDS = (1, 2, 3, 4)  # with the config's seed: 5 seeds for lora-r8, full-ft, QLoRA, sweep
ABLATION_SEEDS = (0,)  # --full: 0, 1, 2
METHOD_SEEDS = (0, 1, 2)  # the method variants for the goals
FRAMECV_SEEDS = (0,)  # --full: 0, 1, 2
FULL_SEEDS = (0, 1, 2)  # --full: ablation, frame cross-validation, adapter-variant table
FOLDS = tuple(range(10))
DEFAULT_WORKERS = 2
ABLATION = {  # name -> (replay, kl, replay_nll)
    "none": (0.0, 0.0, 1.0),
    "replay": (0.5, 0.0, 1.0),
    "kl": (0.5, 1.0, 0.0),
}
# QLoRA, one epoch: 16 rows per step, 12 of them replay (4 SFT rows: 192 updates in the epoch,
# as at batch 8), the rest as the chosen LoRA config. At batch 8 with half replay (the old
# setting) control perplexity rose 14%; three quarters replay keeps it near 3%.
QLORA_SETTING = {"batch_size": 16, "replay": 0.75}
# Method variants for the goals: changes to the chosen r = 8 LoRA config. In single-seed
# trials on a separately pretrained base, 1.5x the steps (900) raised form choice (0.63 ->
# 0.74) and new-shape regular accuracy; no LoRA dropout raised both too (0.73, 0.89) and the
# Spanish slices most.
METHODS = {
    "steps-1.5x": {"steps_factor": 1.5},  # 900 steps instead of 600, same schedule shape
    "dropout-0": {"dropout": 0.0},
}
METHOD_RULE = ("the method variant (plain LoRA r = 8 included) with the highest mean irregular "
               "accuracy on the SFT validation frames (val-irregular-*), never the test frames")
SEED_METRICS = ("irregular_accuracy_tuned", "regular_accuracy_tuned", "control_ppl_change",
                *(f"{name}_accuracy_tuned" for name in SLICE_GROUPS))
GOALS = (  # (goal, results key, at least / at most, threshold or None: the base within a probe)
    ("irregular accuracy, held-out test frames >= 0.90", "irregular_accuracy_tuned", ">=", 0.90),
    ("form choice accuracy >= 0.85", "form_choice_accuracy_tuned", ">=", 0.85),
    ("new-shape irregular accuracy >= 0.85", "new_shape_irregular_accuracy_tuned", ">=", 0.85),
    ("regular accuracy, held-out frames >= base - 1 probe", "regular_accuracy_tuned", ">=",
     None),
    ("new-shape regular accuracy >= base - 1 probe", "new_shape_regular_accuracy_tuned", ">=",
     None),
    ("control perplexity change <= +2%", "control_ppl_change", "<=", 0.02),
)
BASE_SLICES = {"regular_accuracy_tuned": REGULAR_SLICE,
               "new_shape_regular_accuracy_tuned": "new-shape-regular"}


def lr_tag(lr: float) -> str:
    """A folder-safe learning-rate label: 0.003 -> '3e-03'."""
    return f"{lr:.0e}"


def _copy_run(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))


def lr_search(base, out: Path, cfg, method: str, grid, progress=None, on_run=None,
              workers: int = 1) -> dict:
    """One run per learning rate; the lowest best validation loss wins. A learning rate whose
    loss diverges (NaN/inf) is recorded with ``best_val_loss`` None and a note, not chosen."""
    jobs = [Job(f"lrsearch/{method}-lr{lr_tag(lr)}", dataclasses.replace(cfg, method=method,
                                                                        lr=lr)) for lr in grid]
    done = run_jobs(base, out, jobs, workers, progress, on_run)
    return choose_lr(method, grid, done)


def choose_lr(method: str, grid, done: dict) -> dict:
    """The search's record from {run name: results}: every lr and the chosen one."""
    runs = {}
    for lr in grid:
        name = f"lrsearch/{method}-lr{lr_tag(lr)}"
        results = done[name]
        if "diverged" in results:
            runs[lr_tag(lr)] = {"lr": lr, "run": name, "best_val_loss": None,
                                "note": f"diverged: {results['diverged']}"}
        else:
            runs[lr_tag(lr)] = {"lr": lr, "run": name, "best_val_loss": results["best_val_loss"]}
    finite = [r for r in runs.values() if r["best_val_loss"] is not None]
    if not finite:
        raise ValueError(f"learning-rate search for {method}: the loss diverged at every "
                         f"learning rate of the grid {list(grid)}; try lower ones (--lr-grid)")
    chosen = min(finite, key=lambda r: r["best_val_loss"])
    return {"runs": runs, "chosen_lr": chosen["lr"], "chosen_run": chosen["run"],
            "rule": "lowest best validation loss (irregular SFT validation frames)"}


def _named(prefix: str, seed: int, first: int, sep: str = "-seed") -> str:
    """The run folder of ``seed``: ``prefix`` for the first seed, else prefix<sep><seed>."""
    return prefix if seed == first else f"{prefix}{sep}{seed}"


def method_config(cfg, changes: dict, seed: int):
    """``cfg`` with a method variant's changes and ``seed``; ``steps_factor`` multiplies the
    step count."""
    changes = dict(changes)
    factor = changes.pop("steps_factor", None)
    if factor is not None:
        changes["steps"] = round(factor * (cfg.steps or DEFAULT_STEPS))
    return dataclasses.replace(cfg, **changes, seed=seed)


def plan_runs(chosen, ranks, seeds, ablation_seeds, method_seeds, framecv_seeds, variant_seeds,
              qlora_epochs: float, qlora_setting: dict, methods=None, folds=FOLDS) -> tuple:
    """(jobs, layout): every run after the learning-rate search, and {group: {key: [folders in
    seed order]}} saying where each group's runs are."""
    first = chosen.seed
    lora = {s: "lora-r8" if s == first else f"seeds/seed{s}" for s in seeds}
    layout = {"lora_r8": {"8": [lora[s] for s in seeds]},
              "full_ft": {"full": ["full-ft" if s == first else f"full-seeds/seed{s}"
                                   for s in seeds]},
              "qlora": {"qlora": ["qlora-r8" if s == first else f"qlora-seeds/seed{s}"
                                  for s in seeds]},
              "sweep": {}, "ablation": {}, "methods": {}, "framecv": {}, "variants": {}}
    jobs = [Job(lora[s], dataclasses.replace(chosen, seed=s)) for s in seeds if s != first]
    full = dataclasses.replace(chosen, method="full")  # lr replaced below by the caller's
    jobs += [Job(f"full-seeds/seed{s}", dataclasses.replace(full, seed=s))
             for s in seeds if s != first]
    qlora = dataclasses.replace(chosen, method="qlora", steps=None, epochs=qlora_epochs,
                                **qlora_setting)
    jobs += [Job(name, dataclasses.replace(qlora, seed=s))
             for s, name in zip(seeds, layout["qlora"]["qlora"], strict=True)]
    for rank in ranks:
        if rank in (0, 8):
            layout["sweep"][str(rank)] = [] if rank == 0 else layout["lora_r8"]["8"]
            continue
        names = [_named(f"sweep/r{rank}", s, first) for s in seeds]
        layout["sweep"][str(rank)] = names
        jobs += [Job(n, dataclasses.replace(chosen, rank=rank, seed=s))
                 for n, s in zip(names, seeds, strict=True)]
    for name, (replay, kl, replay_nll) in ABLATION.items():
        names = [_named(f"ablation/{name}", s, first) for s in ablation_seeds]
        layout["ablation"][name] = names
        jobs += [Job(n, dataclasses.replace(chosen, replay=replay, kl=kl, replay_nll=replay_nll,
                                            seed=s)) for n, s in zip(names, ablation_seeds,
                                                                     strict=True)]
    layout["ablation"]["both"] = [lora.get(s, f"seeds/seed{s}") for s in ablation_seeds]
    layout["methods"]["lora"] = [lora.get(s, f"seeds/seed{s}") for s in method_seeds]
    jobs += [Job(f"seeds/seed{s}", dataclasses.replace(chosen, seed=s))
             for s in sorted(set(ablation_seeds) | set(method_seeds)) if s not in lora]
    for name, changes in (METHODS if methods is None else methods).items():
        names = [f"methods/{name}/seed{s}" for s in method_seeds]
        layout["methods"][name] = names
        jobs += [Job(n, method_config(chosen, changes, s))
                 for n, s in zip(names, method_seeds, strict=True)]
    for fold in folds if framecv_seeds else ():
        names = [f"framecv/fold{fold}-seed{s}" for s in framecv_seeds]
        layout["framecv"][str(fold)] = names
        jobs += [Job(n, dataclasses.replace(chosen, seed=s), frames=fold_frames(fold))
                 for n, s in zip(names, framecv_seeds, strict=True)]
    for name in VARIANTS if variant_seeds else ():
        if name == "lora":
            layout["variants"][name] = [lora.get(s, f"seeds/seed{s}") for s in variant_seeds]
            jobs += [Job(f"seeds/seed{s}", dataclasses.replace(chosen, seed=s))
                     for s in variant_seeds if s not in lora]
            continue
        names = [f"variants/{name}/seed{s}" for s in variant_seeds]
        layout["variants"][name] = names
        jobs += [Job(n, variant_config(chosen, name, s))
                 for n, s in zip(names, variant_seeds, strict=True)]
    return jobs, layout


def run_experiment(out_dir, cfg, base=None, lr_grid=DEFAULT_LR_GRID, ranks=None,
                   qlora_epochs: float = 1.0, qlora_setting=None, pretrain_cfg=None,
                   command: str = "", repeat_seeds=REPEAT_SEEDS, ablation_seeds=ABLATION_SEEDS,
                   method_seeds=METHOD_SEEDS, framecv_seeds=FRAMECV_SEEDS, variant_seeds=(),
                   workers: int = DEFAULT_WORKERS, progress=None, on_run=None,
                   results_path=None, methods=None, folds=FOLDS) -> dict:
    """Run everything into ``out_dir`` on ``workers`` processes; returns experiment.json's
    content (empty ``framecv_seeds`` / ``variant_seeds``: no cross-validation / variant
    table; ``methods`` and ``folds`` default to :data:`METHODS` and all 10 folds)."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        run_pretraining(out / "base", pretrain_cfg or PretrainConfig(seed=cfg.seed), reuse=True)
        base = out / "base"
    lora_cfg = dataclasses.replace(cfg, method="lora", rank=8)
    search_jobs = [Job(f"lrsearch/{m}-lr{lr_tag(lr)}", dataclasses.replace(lora_cfg, method=m,
                                                                           lr=lr))
                   for m in ("lora", "full") for lr in lr_grid]
    done = run_jobs(base, out, search_jobs, workers, progress, on_run)
    search = {m: choose_lr(m, lr_grid, done) for m in ("lora", "full")}
    _copy_run(out / search["lora"]["chosen_run"], out / "lora-r8")
    _copy_run(out / search["full"]["chosen_run"], out / "full-ft")
    chosen = dataclasses.replace(lora_cfg, lr=search["lora"]["chosen_lr"])
    seeds = [cfg.seed] + [s for s in repeat_seeds if s != cfg.seed]
    qlora_setting = QLORA_SETTING if qlora_setting is None else qlora_setting
    jobs, layout = plan_runs(chosen, list(ranks or DEFAULT_RANKS), seeds, list(ablation_seeds),
                             list(method_seeds), list(framecv_seeds), list(variant_seeds),
                             qlora_epochs, qlora_setting, methods, folds)
    full_lr = search["full"]["chosen_lr"]
    jobs = [dataclasses.replace(j, cfg=dataclasses.replace(j.cfg, lr=full_lr))
            if j.cfg.method == "full" else j for j in jobs]
    phase_started = time.perf_counter()
    run_jobs(base, out, _unique(jobs), workers, progress, on_run)
    runs_wall = time.perf_counter() - phase_started
    sweep = write_seeded_sweep(base, out / "sweep", list(ranks or DEFAULT_RANKS),
                               {int(r): [(f, _results(out / f)) for f in folders]
                                for r, folders in layout["sweep"].items() if int(r) > 0},
                               chosen, runs_wall)
    experiment = {
        "command": command, "seed": cfg.seed, "base": str(Path(base).resolve()),
        "config": chosen.to_dict(), "lr_grid": list(lr_grid), "lr_search": search,
        "runs": {"lora_r8": "lora-r8", "full_ft": "full-ft", "qlora": "qlora-r8",
                 "sweep": "sweep",
                 "ablation": {name: folders[0] for name, folders in layout["ablation"].items()},
                 "seeds": {str(s): f for s, f in zip(seeds, layout["lora_r8"]["8"],
                                                     strict=True)}},
        "layout": layout, "seeds": seeds, "ablation_seeds": list(ablation_seeds),
        "method_seeds": list(method_seeds),
        "framecv_seeds": list(framecv_seeds), "variant_seeds": list(variant_seeds),
        "qlora_setting": {"epochs": qlora_epochs, **qlora_setting},
        "workers": workers, "sweep_wall_s": sweep["wall_s"], "runs_wall_s": runs_wall,
        "qlora_batch_size": qlora_setting.get("batch_size", chosen.batch_size),
    }
    if variant_seeds:
        rows = {name: {s: (f, _results(out / f)) for s, f in zip(variant_seeds, folders,
                                                                  strict=True)}
                for name, folders in layout["variants"].items()}
        write_variants(out / "variants", rows, chosen, runs_wall)
        experiment["runs"]["variants"] = "variants"
        experiment["variants_wall_s"] = runs_wall
    experiment["wall_s"] = time.perf_counter() - started
    experiment["load_average_at_end"] = list(os.getloadavg())  # 1, 5, 15 min: other jobs too
    atomic_write_json(out / "experiment.json", experiment)
    atomic_write_json(out / "summary.json", phase28(out))  # what the report's tables read
    write_report([out], out / "REPORT.md")
    if results_path is not None:
        write_phase28(out, results_path)
    return experiment


def _unique(jobs: list) -> list:
    """Jobs without repeats of the same folder (first one kept)."""
    seen, kept = set(), []
    for job in jobs:
        if job.name not in seen:
            seen.add(job.name)
            kept.append(job)
    return kept


def _results(run_dir: Path) -> dict:
    return read_json(run_dir / "results.json", "run results")


def seed_stats(out: Path, folders: list) -> dict:
    """{results key: seed summary} over the runs in ``folders`` (:data:`SEED_METRICS`)."""
    rows = [_results(out / f) for f in folders]
    stats = {"seeds": [r["seed"] for r in rows], "runs": list(folders)}
    for key in SEED_METRICS:
        values = [r.get(key) for r in rows]
        stats[key] = None if None in values else summarise(values)
    return stats


def goals(out: Path, folders: list) -> list:
    """The issue's goals on the mean over the runs in ``folders``: mean, interval, threshold,
    met on the mean, and met by the whole interval."""
    rows = [_results(out / f) for f in folders]
    table = []
    for goal, key, sense, threshold in GOALS:
        if threshold is None:  # the base's accuracy, less one probe of the slice
            slice_name = BASE_SLICES[key]
            base = rows[0]["slices_base"][slice_name]
            threshold = base["accuracy"] - 1.0 / base["n"]
        stats = summarise([r[key] for r in rows])
        low, high = stats["ci95"] or (stats["mean"], stats["mean"])
        met = stats["mean"] >= threshold if sense == ">=" else stats["mean"] <= threshold
        clear = low >= threshold if sense == ">=" else high <= threshold
        table.append({"goal": goal, "key": key, "threshold": threshold, "sense": sense,
                      "mean": stats["mean"], "ci95": stats["ci95"], "n": stats["n"],
                      "met": met, "met_by_whole_interval": clear})
    return table


def method_table(out: Path, layout: dict) -> dict:
    """The method variants (plain LoRA r = 8 first) with seed summaries and the one chosen by
    validation (:data:`METHOD_RULE`)."""
    table = {name: seed_stats(out, folders) for name, folders in layout.items()}
    for name, entry in table.items():
        entry["changes"] = METHODS.get(name, {})
    best = max(table, key=lambda n: table[n]["validation_irregular_accuracy_tuned"]["mean"])
    order = ["lora"] + sorted(name for name in table if name != "lora")
    return {"order": order, "variants": table, "chosen": best, "rule": METHOD_RULE}


def frame_cv(out: Path, layout: dict) -> dict | None:
    """Per fold: which frames test and validate, the seeds' irregular and form-choice accuracy
    on the fold's test frames; and the mean and worst fold."""
    if not layout:
        return None
    folds = {}
    for fold, folders in sorted(layout.items(), key=lambda kv: int(kv[0])):
        rows = [_results(out / f) for f in folders]
        frames = rows[0]["frames"]
        folds[fold] = {"test_frames": frames["test"], "validation_frames": frames["validation"],
                       "seeds": [r["seed"] for r in rows], "runs": list(folders),
                       "irregular_accuracy": summarise(
                           [r["irregular_accuracy_tuned"] for r in rows]),
                       "form_choice_accuracy": summarise(
                           [r["form_choice_accuracy_tuned"] for r in rows]),
                       "control_ppl_change": summarise([r["control_ppl_change"] for r in rows])}
    means = {k: [f[k]["mean"] for f in folds.values()]
             for k in ("irregular_accuracy", "form_choice_accuracy")}
    worst = min(folds, key=lambda k: folds[k]["irregular_accuracy"]["mean"])
    return {"folds": folds, "irregular_accuracy_mean": summarise(means["irregular_accuracy"]),
            "form_choice_accuracy_mean": summarise(means["form_choice_accuracy"]),
            "worst_fold": worst,
            "worst_irregular_accuracy": folds[worst]["irregular_accuracy"]["mean"],
            "note": ("fold k tests frame k of each tense (past and participle), validates on "
                     "frame k+1 (mod 10) and trains on the other 8; the interval of the mean "
                     "is a t-interval over the 10 folds' means")}


def ablation_table(out: Path, layout: dict) -> dict:
    """The anti-forgetting ablation: each variant's settings, its first seed's figures (as
    before) and its seed summary."""
    table = {}
    for name, folders in layout.items():
        res = _results(out / folders[0])
        ft = read_json(out / folders[0] / "config.json", "run config")["finetune"]
        table[name] = {k: res[k] for k in ("replay", "kl", "irregular_accuracy_tuned",
                                           "regular_accuracy_tuned", "control_ppl_change")}
        table[name]["replay_nll"] = ft.get("replay_nll", 1.0)
        table[name]["seeds"] = seed_stats(out, folders)
    return table


def phase28(out_dir) -> dict:
    """The quiz's results file, read back from an experiment folder's run files."""
    out = Path(out_dir)
    experiment = read_json(out / "experiment.json", "experiment file")
    runs, layout = experiment["runs"], experiment["layout"]
    lora, full = _results(out / runs["lora_r8"]), _results(out / runs["full_ft"])
    qlora = _results(out / runs["qlora"])
    sweep = read_json(out / runs["sweep"] / "sweep.json", "sweep file")
    trained = [i for i, r in enumerate(sweep["ranks"]) if r > 0]
    base_index = sweep["ranks"].index(0) if 0 in sweep["ranks"] else None
    keys = ("irregular_accuracy_base", "irregular_accuracy_tuned", "regular_accuracy_base",
            "regular_accuracy_tuned", "control_ppl_base", "control_ppl_tuned",
            "control_ppl_change", "trainable_params", "lr", "steps", "best_step",
            *(f"{name}_accuracy_{w}" for name in SLICE_GROUPS for w in ("base", "tuned")))

    def by_tense(res: dict) -> dict:
        before, after = res["control_ppl_by_tense_base"], res["control_ppl_by_tense_tuned"]
        return {t: after[t] / before[t] - 1.0 for t in before}

    seeds = {"lora_r8": seed_stats(out, layout["lora_r8"]["8"]),
             "full_ft": seed_stats(out, layout["full_ft"]["full"]),
             "qlora": seed_stats(out, layout["qlora"]["qlora"])}
    methods = method_table(out, layout["methods"])
    qlora_gain = summarise([_results(out / f)["irregular_accuracy_tuned"]
                            - _results(out / f)["irregular_accuracy_base"]
                            for f in layout["qlora"]["qlora"]])
    qlora_ppl = seeds["qlora"]["control_ppl_change"]
    qlora_config = read_json(out / runs["qlora"] / "config.json", "run config")["finetune"]
    return {
        "command": experiment["command"], "seed": experiment["seed"],
        "wall_s": experiment["wall_s"], "workers": experiment["workers"],
        "runs_wall_s": experiment["runs_wall_s"],
        "load_average_at_end": experiment["load_average_at_end"],
        "interval_note": INTERVAL_NOTE,
        "lora_r8": {k: lora[k] for k in keys} | {"control_ppl_change_by_tense": by_tense(lora)},
        "full_ft": {k: full[k] for k in keys} | {"control_ppl_change_by_tense": by_tense(full)},
        "seeds": seeds,
        "lr_search": {m: {"chosen_lr": s["chosen_lr"], "grid": experiment["lr_grid"],
                          "rule": s["rule"]} for m, s in experiment["lr_search"].items()},
        "sweep": {
            "ranks": [sweep["ranks"][i] for i in trained],
            "irregular_accuracy": [sweep["irregular_accuracy"][i] for i in trained],
            "regular_accuracy": [sweep["regular_accuracy"][i] for i in trained],
            "control_ppl": [sweep["control_ppl"][i] for i in trained],
            "trainable_params": [sweep["trainable_params"][i] for i in trained],
            "irregular_accuracy_ci95": [sweep["stats"][str(sweep["ranks"][i])][
                "irregular_accuracy"]["ci95"] for i in trained],
            "seeds": sweep["seeds"], "values": "means over seeds",
            "elbow_rank": sweep["elbow_rank"], "elbow_rule": sweep["elbow_rule"],
            "base": None if base_index is None else {
                "rank": 0, "irregular_accuracy": sweep["irregular_accuracy"][base_index],
                "regular_accuracy": sweep["regular_accuracy"][base_index],
                "control_ppl": sweep["control_ppl"][base_index]},
            "wall_s": sweep["wall_s"],
        },
        "ablation": ablation_table(out, layout["ablation"]),
        "methods": methods,
        "frame_cv": frame_cv(out, layout["framecv"]),
        "goals": {"lora_r8": goals(out, layout["lora_r8"]["8"]),
                  "chosen_method": {"name": methods["chosen"],
                                    "table": goals(out, layout["methods"][methods["chosen"]])}},
        "lora_r8_seeds": _seed_spread(out, runs.get("seeds") or {}),
        "qlora": {
            "epochs": qlora_config["epochs"], "batch_size": qlora_config["batch_size"],
            "replay": qlora_config["replay"], "kl": qlora_config["kl"], "lr": qlora_config["lr"],
            "steps": qlora["steps"],
            "irregular_accuracy_tuned": qlora["irregular_accuracy_tuned"],
            "regular_accuracy_tuned": qlora["regular_accuracy_tuned"],
            "control_ppl_change": qlora["control_ppl_change"],
            "irregular_gain_seeds": qlora_gain,
            "course_bar": {"irregular_gain_at_least": 0.10, "control_ppl_change_at_most": 0.05,
                           "met_on_mean": qlora_gain["mean"] >= 0.10
                           and qlora_ppl["mean"] <= 0.05},
            "logit_diff_relative": qlora["qlora"]["logit_difference"]["relative"],
            "logit_diff_mean_abs": qlora["qlora"]["logit_difference"]["mean_abs"],
            "memory_table": qlora["qlora"]["memory_table"],
            "nf4_base_control_ppl": qlora["qlora"]["nf4_base_without_adapter"]["control_ppl"],
            "nf4_weight_relative_error_mean": qlora["qlora"]["nf4_weight_relative_error"].get(
                "mean"),
        },
        "notes": {"accuracy": lora.get("accuracy_note"),
                  "control_ppl_change": "after / before - 1 on the regular-verb control set",
                  "lora_r8": "the seed-0 run; 'seeds' holds the 5-seed means and intervals",
                  "sweep": "ranks 2..32 are trained (means over seeds); sweep.base is rank 0 "
                           "(the untouched base)"},
    } | _variants_section(out, runs.get("variants"))


def _variants_section(out: Path, folder: str | None) -> dict:
    """{"variants": the adapter-variant table} when the experiment ran it, else {}."""
    if folder is None:
        return {}
    table = read_json(out / folder / "variants.json", "variants file")
    variants = {name: {k: v for k, v in entry.items() if k != "runs"}
                for name, entry in table["variants"].items()}
    return {"variants": {k: v for k, v in table.items() if k != "variants"}
            | {"variants": variants}}


def _seed_spread(out: Path, seeds: dict) -> dict:
    """The r = 8 run repeated with other seeds (LoRA init, data order, dropout; same frames)."""
    keys = ("irregular_accuracy_tuned", "regular_accuracy_tuned", "control_ppl_change")
    rows = {seed: _results(out / folder) for seed, folder in sorted(seeds.items())}
    spread = {"seeds": [int(seed) for seed in rows]}
    for key in keys:
        values = [res[key] for res in rows.values()]
        spread[key] = values
        spread[key + "_mean"] = sum(values) / len(values) if values else None
    return spread


def write_phase28(out_dir, path) -> Path:
    """Write :func:`phase28` to ``path`` and the sweep plot beside it (sweep PNG for the README)."""
    path = Path(path)
    summary = Path(out_dir) / "summary.json"
    atomic_write_json(path, read_json(summary, "experiment summary") if summary.is_file()
                      else phase28(out_dir))
    for source, name in (("sweep/sweep.png", "phase-28-sweep.png"),
                         ("variants/variants.png", "phase-28-variants.png")):
        png = Path(out_dir) / source
        if png.is_file():
            atomic_write_bytes(path.parent / name, png.read_bytes())
    return path
