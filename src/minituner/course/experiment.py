"""The whole phase-28 experiment in one call: learning-rate search for LoRA r = 8 and full
fine-tuning, the anti-forgetting ablation, the rank sweep, the QLoRA run, the report, and the
results file the quiz reads (docs/results/phase-28.json).

Folder layout under ``out``: base/ (unless --base is given), lrsearch/{lora,full}-lr<lr>/,
lora-r8/ and full-ft/ (copies of the chosen learning rate's runs), ablation/{none,replay,kl}/
("both" is lora-r8), seeds/seed<s>/ (lora-r8 repeated with other seeds), sweep/r<rank>/ +
sweep.json + sweep.png, qlora-r8/ (one epoch at batch 8 by default: 192 optimizer steps instead
of 48 at batch 32), variants/<variant>/seed<s>/ + variants.json + variants.png (the
adapter-variant table of :mod:`minituner.course.variants`; its plain-LoRA rows are lora-r8/ and
seeds/), experiment.json and REPORT.md. Every number in the report and the results
file is read back from these files.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from minituner.course.finetune import run_with_progress
from minituner.course.pretraining import run_pretraining
from minituner.course.report import write_report
from minituner.course.sweep import DEFAULT_RANKS, run_sweep
from minituner.course.variants import DEFAULT_SEEDS, run_variants
from minituner.training.config import PretrainConfig
from minituner.training.loop import NonFiniteLossError
from minituner.util.files import atomic_write_bytes, atomic_write_json, read_json

DEFAULT_LR_GRID = (1e-3, 3e-3, 1e-2)
ABLATION = {  # name -> (replay, kl, replay_nll)
    "none": (0.0, 0.0, 1.0),
    "replay": (0.5, 0.0, 1.0),
    "kl": (0.5, 1.0, 0.0),
}


def lr_tag(lr: float) -> str:
    """A folder-safe learning-rate label: 0.003 -> '3e-03'."""
    return f"{lr:.0e}"


def _copy_run(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))


def lr_search(base, out: Path, cfg, method: str, grid, progress=None, on_run=None) -> dict:
    """One run per learning rate; the lowest best validation loss wins. A learning rate whose
    loss diverges (NaN/inf) is recorded with ``best_val_loss`` None and a note, not chosen."""
    runs = {}
    for lr in grid:
        name = f"lrsearch/{method}-lr{lr_tag(lr)}"
        run_cfg = dataclasses.replace(cfg, method=method, lr=lr)
        try:
            results = run_with_progress(base, out / name, run_cfg, progress, overwrite=True)
        except NonFiniteLossError as exc:
            runs[lr_tag(lr)] = {"lr": lr, "run": name, "best_val_loss": None,
                                "note": f"diverged: {exc}"}
            continue
        runs[lr_tag(lr)] = {"lr": lr, "run": name, "best_val_loss": results["best_val_loss"]}
        if on_run is not None:
            on_run(name, results)
    finite = [r for r in runs.values() if r["best_val_loss"] is not None]
    if not finite:
        raise ValueError(f"learning-rate search for {method}: the loss diverged at every "
                         f"learning rate of the grid {list(grid)}; try lower ones (--lr-grid)")
    chosen = min(finite, key=lambda r: r["best_val_loss"])
    return {"runs": runs, "chosen_lr": chosen["lr"], "chosen_run": chosen["run"],
            "rule": "lowest best validation loss (irregular SFT validation frames)"}


def run_experiment(out_dir, cfg, base=None, lr_grid=DEFAULT_LR_GRID, ranks=None,
                   qlora_epochs: float = 1.0, qlora_batch_size: int = 8, pretrain_cfg=None,
                   command: str = "", repeat_seeds=(1, 2), variant_seeds=DEFAULT_SEEDS,
                   progress=None, on_run=None, results_path=None) -> dict:
    """Run everything into ``out_dir``; returns experiment.json's content (``variant_seeds``
    empty: no adapter-variant table)."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        run_pretraining(out / "base", pretrain_cfg or PretrainConfig(seed=cfg.seed), reuse=True)
        base = out / "base"
    lora_cfg = dataclasses.replace(cfg, method="lora", rank=8)
    search = {
        "lora": lr_search(base, out, lora_cfg, "lora", lr_grid, progress, on_run),
        "full": lr_search(base, out, lora_cfg, "full", lr_grid, progress, on_run),
    }
    _copy_run(out / search["lora"]["chosen_run"], out / "lora-r8")
    _copy_run(out / search["full"]["chosen_run"], out / "full-ft")
    chosen = dataclasses.replace(lora_cfg, lr=search["lora"]["chosen_lr"])
    ablation = {"both": "lora-r8"}
    for name, (replay, kl, replay_nll) in ABLATION.items():
        variant = dataclasses.replace(chosen, replay=replay, kl=kl, replay_nll=replay_nll)
        results = run_with_progress(base, out / "ablation" / name, variant, progress,
                                    overwrite=True)
        ablation[name] = f"ablation/{name}"
        if on_run is not None:
            on_run(f"ablation/{name}", results)
    seeds = {str(chosen.seed): "lora-r8"}
    for seed in repeat_seeds:
        if seed != chosen.seed:
            results = run_with_progress(base, out / "seeds" / f"seed{seed}",
                                        dataclasses.replace(chosen, seed=seed), progress,
                                        overwrite=True)
            seeds[str(seed)] = f"seeds/seed{seed}"
            if on_run is not None:
                on_run(f"seeds/seed{seed}", results)
    sweep = run_sweep(base, out / "sweep", list(ranks or DEFAULT_RANKS), chosen,
                      on_run=None, progress=progress)
    qlora_cfg = dataclasses.replace(chosen, method="qlora", steps=None, epochs=qlora_epochs,
                                    batch_size=qlora_batch_size)
    results = run_with_progress(base, out / "qlora-r8", qlora_cfg, progress, overwrite=True)
    if on_run is not None:
        on_run("qlora-r8", results)
    variants = None
    if variant_seeds:
        reuse = {("lora", int(seed)): out / folder for seed, folder in seeds.items()}
        variants = run_variants(base, out / "variants", chosen, seeds=tuple(variant_seeds),
                                reuse=reuse, progress=progress, on_run=on_run)
    experiment = {
        "command": command, "seed": cfg.seed, "base": str(Path(base).resolve()),
        "config": chosen.to_dict(), "lr_grid": list(lr_grid), "lr_search": search,
        "runs": {"lora_r8": "lora-r8", "full_ft": "full-ft", "qlora": "qlora-r8",
                 "sweep": "sweep", "ablation": ablation, "seeds": seeds},
        "sweep_wall_s": sweep["wall_s"], "qlora_batch_size": qlora_batch_size,
    }
    if variants is not None:
        experiment["runs"]["variants"] = "variants"
        experiment["variants_wall_s"] = variants["wall_s"]
    experiment["wall_s"] = time.perf_counter() - started
    atomic_write_json(out / "experiment.json", experiment)
    write_report([out], out / "REPORT.md")
    if results_path is not None:
        write_phase28(out, results_path)
    return experiment


def _results(run_dir: Path) -> dict:
    return read_json(run_dir / "results.json", "run results")


def phase28(out_dir) -> dict:
    """The quiz's results file, read back from an experiment folder's run files."""
    out = Path(out_dir)
    experiment = read_json(out / "experiment.json", "experiment file")
    runs = experiment["runs"]
    lora, full = _results(out / runs["lora_r8"]), _results(out / runs["full_ft"])
    qlora = _results(out / runs["qlora"])
    sweep = read_json(out / runs["sweep"] / "sweep.json", "sweep file")
    trained = [i for i, r in enumerate(sweep["ranks"]) if r > 0]
    base_index = sweep["ranks"].index(0) if 0 in sweep["ranks"] else None
    keys = ("irregular_accuracy_base", "irregular_accuracy_tuned", "regular_accuracy_base",
            "regular_accuracy_tuned", "control_ppl_base", "control_ppl_tuned",
            "control_ppl_change", "trainable_params", "lr", "steps", "best_step")
    ablation = {}
    for name, folder in runs["ablation"].items():
        res = _results(out / folder)
        ablation[name] = {k: res[k] for k in ("replay", "kl", "irregular_accuracy_tuned",
                                              "regular_accuracy_tuned", "control_ppl_change")}
        ablation[name]["replay_nll"] = read_json(out / folder / "config.json")["finetune"].get(
            "replay_nll", 1.0)
    def by_tense(res: dict) -> dict:
        before, after = res["control_ppl_by_tense_base"], res["control_ppl_by_tense_tuned"]
        return {t: after[t] / before[t] - 1.0 for t in before}

    return {
        "command": experiment["command"], "seed": experiment["seed"],
        "lora_r8": {k: lora[k] for k in keys} | {"control_ppl_change_by_tense": by_tense(lora)},
        "full_ft": {k: full[k] for k in keys} | {"control_ppl_change_by_tense": by_tense(full)},
        "lr_search": {m: {"chosen_lr": s["chosen_lr"], "grid": experiment["lr_grid"],
                          "rule": s["rule"]} for m, s in experiment["lr_search"].items()},
        "sweep": {
            "ranks": [sweep["ranks"][i] for i in trained],
            "irregular_accuracy": [sweep["irregular_accuracy"][i] for i in trained],
            "regular_accuracy": [sweep["regular_accuracy"][i] for i in trained],
            "control_ppl": [sweep["control_ppl"][i] for i in trained],
            "trainable_params": [sweep["trainable_params"][i] for i in trained],
            "elbow_rank": sweep["elbow_rank"], "elbow_rule": sweep["elbow_rule"],
            "base": None if base_index is None else {
                "rank": 0, "irregular_accuracy": sweep["irregular_accuracy"][base_index],
                "regular_accuracy": sweep["regular_accuracy"][base_index],
                "control_ppl": sweep["control_ppl"][base_index]},
            "wall_s": sweep["wall_s"],
        },
        "ablation": ablation,
        "lora_r8_seeds": _seed_spread(out, runs.get("seeds") or {}),
        "qlora": {
            "epochs": read_json(out / runs["qlora"] / "config.json")["finetune"]["epochs"],
            "batch_size": read_json(out / runs["qlora"] / "config.json")["finetune"]["batch_size"],
            "steps": qlora["steps"],
            "irregular_accuracy_tuned": qlora["irregular_accuracy_tuned"],
            "regular_accuracy_tuned": qlora["regular_accuracy_tuned"],
            "control_ppl_change": qlora["control_ppl_change"],
            "logit_diff_relative": qlora["qlora"]["logit_difference"]["relative"],
            "logit_diff_mean_abs": qlora["qlora"]["logit_difference"]["mean_abs"],
            "memory_table": qlora["qlora"]["memory_table"],
            "nf4_base_control_ppl": qlora["qlora"]["nf4_base_without_adapter"]["control_ppl"],
            "nf4_weight_relative_error_mean": qlora["qlora"]["nf4_weight_relative_error"].get(
                "mean"),
        },
        "notes": {"accuracy": lora.get("accuracy_note"),
                  "control_ppl_change": "after / before - 1 on the regular-verb control set",
                  "sweep": "ranks 2..32 are trained; sweep.base is rank 0 (the untouched base)"},
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
    atomic_write_json(path, phase28(out_dir))
    for source, name in (("sweep/sweep.png", "phase-28-sweep.png"),
                         ("variants/variants.png", "phase-28-variants.png")):
        png = Path(out_dir) / source
        if png.is_file():
            atomic_write_bytes(path.parent / name, png.read_bytes())
    return path
