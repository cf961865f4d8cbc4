"""REPORT.md from run folders: tables and PNG plots, every number read from the run files.

Accepted folders: a Mini-GPT fine-tuning run (config.json + results.json), a sweep
(sweep.json), an adapter-variant table (variants.json), an experiment (experiment.json, which
brings its runs, ablation, sweep, QLoRA run and variant table), or a base run (its pretraining
results). Transformers fine-tuning runs are given separately (``transformers_runs``; the CLI
tells them apart by their config.json) and get a table of their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minituner.course.finetune import DEFAULT_STEPS
from minituner.util.files import atomic_write_text, read_json
from minituner.util.plots import plot_loss_curves

RUN_KINDS = {"finetune": "runs", "pretrain": "bases"}  # Mini-GPT config.json kinds read here


def _load(path: Path) -> dict:
    return read_json(path, path.name)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"


def _acc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mib(value) -> str:
    return f"{value / 2**20:.3f} MiB"


def command_of(run_dir: Path) -> str:
    """The ``minituner finetune`` command that reproduces a run (from its config.json)."""
    config = _load(run_dir / "config.json")
    ft = config["finetune"]
    parts = ["minituner finetune", f"--base {config['base']['path']}", f"--method {ft['method']}"]
    if ft["method"] != "full":
        parts.append(f"--rank {ft['rank']} --alpha {ft['alpha']:g}")
    parts.append(f"--epochs {ft['epochs']:g}" if ft.get("epochs") else
                 f"--steps {ft['steps'] or DEFAULT_STEPS}")
    parts.append(f"--batch-size {ft['batch_size']} --lr {ft['lr']:g} --replay {ft['replay']:g} "
                 f"--kl {ft['kl']:g}")
    if ft.get("replay_nll", 1.0) != 1.0:
        parts.append(f"--replay-nll {ft['replay_nll']:g}")
    if ft.get("dropout"):
        parts.append(f"--dropout {ft['dropout']:g}")
    parts.append(f"--seed {ft['seed']} --out {run_dir}")
    return " ".join(parts)


def classify(folders) -> dict:
    """{"experiments": [...], "sweeps": [...], "variants": [...], "runs": [...], "bases": [...]}
    of folders."""
    found = {"experiments": [], "sweeps": [], "variants": [], "runs": [], "bases": []}
    for folder in map(Path, folders):
        if (folder / "experiment.json").is_file():
            found["experiments"].append(folder)
        elif (folder / "sweep.json").is_file():
            found["sweeps"].append(folder)
        elif (folder / "variants.json").is_file():
            found["variants"].append(folder)
        elif (folder / "results.json").is_file() and (folder / "config.json").is_file():
            kind = _load(folder / "config.json").get("kind")
            if kind not in RUN_KINDS:
                raise ValueError(f"{folder / 'config.json'}: field 'kind' is {kind!r}; the "
                                 f"report reads Mini-GPT runs of kind {', '.join(RUN_KINDS)}")
            found[RUN_KINDS[kind]].append(folder)
        else:
            raise ValueError(f"{folder}: not a run, sweep, variants or experiment folder (no "
                             "results.json, sweep.json, variants.json or experiment.json)")
    return found


def runs_table(runs: list, rel) -> list:
    """Markdown lines: one row per fine-tuning run."""
    lines = ["| run | method | r | steps | lr | replay | kl | irregular acc base -> tuned | "
             "regular acc base -> tuned | control ppl base -> tuned (change) | trainable | "
             "wall s |", "|" + "---|" * 12]
    for run in runs:
        res = _load(run / "results.json")
        lines.append(
            f"| {rel(run)} | {res['method']} | {res['rank'] if res['rank'] is not None else '-'}"
            f" | {res['steps']} | {res['lr']:g} | {res['replay']:g} | {res['kl']:g} | "
            f"{_acc(res['irregular_accuracy_base'])} -> {_acc(res['irregular_accuracy_tuned'])} | "
            f"{_acc(res['regular_accuracy_base'])} -> {_acc(res['regular_accuracy_tuned'])} | "
            f"{res['control_ppl_base']:.4f} -> {res['control_ppl_tuned']:.4f} "
            f"({_pct(res['control_ppl_change'])}) | {res['trainable_params']:,} | "
            f"{res['wall_s']:.1f} |")
    return lines


def slices_table(runs: list, rel) -> list:
    """Markdown lines: tuned accuracy per probe slice (base in the first row)."""
    first = _load(runs[0] / "results.json")
    names = list(first["slices_base"])
    lines = ["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    row = [f"{first['slices_base'][n]['accuracy']:.3f}" for n in names]
    lines.append("| base | " + " | ".join(row) + " |")
    for run in runs:
        tuned = _load(run / "results.json")["slices_tuned"]
        lines.append(f"| {rel(run)} | " + " | ".join(
            f"{tuned[n]['accuracy']:.3f}" if n in tuned else "n/a" for n in names) + " |")
    counts = ", ".join(f"{n}: n={first['slices_base'][n]['n']}" for n in names)
    return lines + ["", f"Probe counts: {counts}."]


def tense_table(runs: list, rel) -> list:
    """Markdown lines: control perplexity change per tense of the control lines."""
    first = _load(runs[0] / "results.json")
    tenses = list(first.get("control_ppl_by_tense_base") or {})
    if not tenses:
        return []
    lines = ["| run | " + " | ".join(tenses) + " |", "|" + "---|" * (len(tenses) + 1)]
    for run in runs:
        res = _load(run / "results.json")
        before, after = res["control_ppl_by_tense_base"], res["control_ppl_by_tense_tuned"]
        lines.append(f"| {rel(run)} | " + " | ".join(
            _pct(after[t] / before[t] - 1.0) if t in after else "n/a" for t in tenses) + " |")
    base = " ".join(f"{t} {first['control_ppl_by_tense_base'][t]:.4f};" for t in tenses)
    return ["", "### Control perplexity change by tense", ""] + lines + [
        "", f"Base control perplexity per tense: {base.rstrip(';')}. The fine-tuning data put "
        "eight new verbs into the past and participle frames, so some rise there is the price "
        "of learning them; a rise in the other tenses is collateral.", ""]


def bytes_table(runs: list, rel) -> list:
    """Markdown lines: exact tensor bytes of the training state, and the process peak RSS."""
    lines = ["| run | trainable params | frozen weights (+ dequant scratch) | gradients | "
             "optimizer state | saved activations | KL reference copy | total | batch | "
             "process peak RSS |", "|" + "---|" * 10]
    for run in runs:
        res = _load(run / "results.json")
        tb = res["tensor_bytes"]
        lines.append(
            f"| {rel(run)} | {_mib(tb['parameters_trainable_bytes'])} | "
            f"{_mib(tb['frozen_weight_bytes'] + tb['dequant_scratch_bytes'])} | "
            f"{_mib(tb['gradient_bytes'])} | "
            f"{_mib(tb['optimizer_state_bytes'])} | {_mib(tb['saved_activation_bytes'])} | "
            f"{_mib(tb.get('kl_reference_bytes', 0))} | "
            f"{_mib(tb['total_bytes'])} | {'x'.join(map(str, tb['batch_shape']))} | "
            f"{res['peak_rss_bytes'] / 2**20:.0f} MiB |")
    first = _load(runs[0] / "results.json")
    return lines + ["", f"Tensor bytes: {first['tensor_bytes']['note']}.",
                    f"Peak RSS: {first.get('peak_rss_note', '')}."]


def sweep_section(sweep_dir: Path, rel) -> list:
    """Markdown lines: the rank sweep table, its elbow and its plot."""
    sweep = _load(sweep_dir / "sweep.json")
    changes = sweep.get("control_ppl_change") or [None] * len(sweep["ranks"])
    lines = [f"## Rank sweep ({rel(sweep_dir)})", "",
             "| r | trainable params | irregular acc | regular acc | control ppl | "
             "change vs base |",
             "|---|---|---|---|---|---|"]
    stats = sweep.get("stats") or {}
    for i, rank in enumerate(sweep["ranks"]):
        irregular = stats.get(str(rank), {}).get("irregular_accuracy")
        lines.append(f"| {rank} | {sweep['trainable_params'][i]:,} | "
                     f"{_stat(irregular) if irregular else _acc(sweep['irregular_accuracy'][i])} | "
                     f"{_acc(sweep['regular_accuracy'][i])} | {sweep['control_ppl'][i]:.4f} | "
                     f"{_pct(changes[i])} |")
    cfg = sweep["config"]
    return lines + [
        "", f"Elbow: **r = {sweep['elbow_rank']}** (rule: {sweep['elbow_rule']}). Same data, "
        f"{cfg.get('steps') or DEFAULT_STEPS} steps, lr {cfg['lr']:g}, seeds "
        f"{sweep.get('seeds', cfg.get('seed'))} at every rank (irregular: mean ± std [95% "
        "interval]; other columns: means); " + (
            f"all runs after the learning-rate search, the sweep's among them, took "
            f"{sweep['wall_s']:.1f} s on the workers." if "stats" in sweep else
            f"sweep wall time {sweep['wall_s']:.1f} s."), "",
        f"![rank sweep]({rel(sweep_dir / 'sweep.png')})", ""]


def _mean_std(stats: dict, show) -> str:
    std = "" if stats["std"] is None else f" ± {show(stats['std']).lstrip('+')}"
    return show(stats["mean"]) + std


def variants_section(variants_dir: Path, rel) -> list:
    """Markdown lines: the adapter-variant table (mean ± std over seeds) and its plot."""
    table = _load(variants_dir / "variants.json")
    base = table["base"]
    lines = [f"## Adapter variants at r = 8 ({rel(variants_dir)})", "",
             "| variant | trainable params | irregular acc | regular acc | control ppl | "
             "control ppl change |", "|---|---|---|---|---|---|",
             f"| base | 0 | {_acc(base['irregular_accuracy'])} | "
             f"{_acc(base['regular_accuracy'])} | {_num(base['control_ppl'])} | |"]
    for entry in (table["variants"][name] for name in table["order"]):
        lines.append(f"| {entry['label']} | {entry['trainable_params']:,} | "
                     f"{_mean_std(entry['irregular_accuracy'], _acc)} | "
                     f"{_mean_std(entry['regular_accuracy'], _acc)} | "
                     f"{_mean_std(entry['control_ppl'], _num)} | "
                     f"{_mean_std(entry['control_ppl_change'], _pct)} |")
    seeds = next(iter(table["variants"].values()))["seeds"] if table["variants"] else []
    cfg = table["config"]
    lines += ["", f"Mean ± {table['std_note']}, seeds {seeds}. Same data, steps "
              f"({cfg['steps'] or DEFAULT_STEPS}), lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
              f"replay {cfg['replay']:g}, KL {cfg['kl']:g}, alpha {cfg['alpha']:g} for every "
              f"variant. {table['spread_rule'][0].upper()}{table['spread_rule'][1:]}."]
    vs_lora = table.get("vs_lora") or {}
    beyond = [f"{name} {metric.replace('_', ' ')} ({_num(c['delta'], '+.4f')})"
              for name in table["order"] for metric, c in vs_lora.get(name, {}).items()
              if c["beyond_seed_spread"]]
    lines += ["", "Beyond the seed spread: " + (", ".join(beyond) if beyond else "none") + ".",
              "", f"![adapter variants]({rel(variants_dir / 'variants.png')})", ""]
    return lines


def qlora_section(run: Path, rel) -> list:
    """Markdown lines: QLoRA memory table, logit difference and accuracy."""
    res = _load(run / "results.json")
    q = res["qlora"]
    diff = q["logit_difference"]
    lines = [f"## QLoRA ({rel(run)})", "",
             f"Irregular accuracy {_acc(res['irregular_accuracy_base'])} -> "
             f"{_acc(res['irregular_accuracy_tuned'])}, regular "
             f"{_acc(res['regular_accuracy_tuned'])}, control ppl change "
             f"{_pct(res['control_ppl_change'])} after {res['epochs_seen']:.2f} epochs "
             f"({res['steps']} steps).", "",
             f"Logit difference, same adapter on the NF4 base vs the fp32 base: mean |diff| "
             f"{diff['mean_abs']:.4f}, max {diff['max_abs']:.4f}, mean |logit| "
             f"{diff['mean_abs_logit']:.4f}: **{100 * diff['relative']:.2f}%** relative. The same "
             f"adapter on the fp32 base scores irregular "
             f"{_acc(q['same_adapter_on_fp32_base']['irregular_accuracy'])}.", ""]
    nf4 = q.get("nf4_base_without_adapter")
    if nf4:
        err = q.get("nf4_weight_relative_error") or {}
        lines += [f"The NF4 base alone (adapter disabled): control ppl {nf4['control_ppl']:.4f} "
                  f"vs {res['control_ppl_base']:.4f} for the fp32 base, irregular "
                  f"{_acc(nf4['irregular_accuracy'])}; NF4 relative weight error "
                  f"||W - deq(W)|| / ||W|| = {err.get('mean', float('nan')):.4f} on average "
                  f"({err.get('min', float('nan')):.4f}-{err.get('max', float('nan')):.4f}).", ""]
    lines += [
             "| setup | source | weights | gradients | optimizer | activations | total |",
             "|---|---|---|---|---|---|---|"]
    for row in q["memory_table"]:
        for source in ("predicted", "measured"):
            b = row[source]
            lines.append(f"| {row['setup']} | {source} | {b['weights']:,} | {b['gradients']:,} | "
                         f"{b['optimizer']:,} | {b['activations']:,} | {b['total']:,} |")
    return lines + ["", f"Bytes. {q['memory_note']} Shape: {json.dumps(q['memory_shape'])}.", ""]


def experiment_sections(exp_dir: Path, rel) -> list:
    """Markdown lines: learning-rate search, forgetting comparison and ablation."""
    exp = _load(exp_dir / "experiment.json")
    runs = exp["runs"]
    lines = [f"## Experiment ({rel(exp_dir)})", "", f"Command: `{exp['command']}` (seed "
             f"{exp['seed']}); wall time {exp['wall_s']:.1f} s.", "",
             "### Learning-rate search", "", "| method | lr | best val loss | chosen |",
             "|---|---|---|---|"]
    for method, search in exp["lr_search"].items():
        for entry in sorted(search["runs"].values(), key=lambda e: e["lr"]):
            chosen = "yes" if entry["lr"] == search["chosen_lr"] else ""
            loss = entry["best_val_loss"]
            shown = "diverged" if loss is None else f"{loss:.4f}"
            lines.append(f"| {method} | {entry['lr']:g} | {shown} | {chosen} |")
    lines += ["", f"Rule: {next(iter(exp['lr_search'].values()))['rule']}.", "",
              "### Forgetting: LoRA r = 8 vs full fine-tuning", "",
              "| method | lr | trainable params | irregular acc | regular acc | "
              "control ppl change |",
              "|---|---|---|---|---|---|"]
    for key in ("lora_r8", "full_ft"):
        res = _load(exp_dir / runs[key] / "results.json")
        lines.append(f"| {key} | {res['lr']:g} | {res['trainable_params']:,} | "
                     f"{_acc(res['irregular_accuracy_tuned'])} | "
                     f"{_acc(res['regular_accuracy_tuned'])} | {_pct(res['control_ppl_change'])} |")
    lines += ["", "### Anti-forgetting ablation (LoRA r = 8)", "",
              "| variant | replay rows | replay NLL weight | KL weight | irregular acc | "
              "regular acc | control ppl change |", "|---|---|---|---|---|---|---|"]
    for name in ("none", "replay", "kl", "both"):
        folder = exp_dir / runs["ablation"][name]
        res, ft = _load(folder / "results.json"), _load(folder / "config.json")["finetune"]
        lines.append(f"| {name} | {ft['replay']:g} | {ft.get('replay_nll', 1.0):g} | {ft['kl']:g} "
                     f"| {_acc(res['irregular_accuracy_tuned'])} | "
                     f"{_acc(res['regular_accuracy_tuned'])} | {_pct(res['control_ppl_change'])} |")
    seeds = runs.get("seeds") or {}
    if len(seeds) > 1:
        lines += ["", "### The r = 8 run with other seeds (same data, frames and settings)", "",
                  "| seed | irregular acc | regular acc | control ppl change |",
                  "|---|---|---|---|"]
        for seed, folder in sorted(seeds.items()):
            res = _load(exp_dir / folder / "results.json")
            lines.append(f"| {seed} | {_acc(res['irregular_accuracy_tuned'])} | "
                         f"{_acc(res['regular_accuracy_tuned'])} | "
                         f"{_pct(res['control_ppl_change'])} |")
    return lines + [""]


def _stat(stats, show=_acc) -> str:
    """'mean ± std [low, high]' of a seed summary (the mean alone for one seed)."""
    if stats is None:
        return "n/a"
    if stats.get("std") is None:
        return show(stats["mean"])
    low, high = stats["ci95"]
    return (f"{show(stats['mean'])} ± {show(stats['std']).lstrip('+')} "
            f"[{show(low)}, {show(high)}]")


SEED_COLUMNS = (("irregular_accuracy_tuned", "irregular", _acc),
                ("form_choice_accuracy_tuned", "form choice", _acc),
                ("new_shape_irregular_accuracy_tuned", "new-shape irregular", _acc),
                ("regular_accuracy_tuned", "regular", _acc),
                ("new_shape_regular_accuracy_tuned", "new-shape regular", _acc),
                ("control_ppl_change", "control ppl change", _pct),
                ("spanish_irregular_accuracy_tuned", "es irregular", _acc),
                ("spanish_form_choice_accuracy_tuned", "es form choice", _acc),
                ("spanish_new_shape_regular_accuracy_tuned", "es new-shape regular", _acc))


def seeds_table(rows: dict) -> list:
    """Markdown lines: one row per {name: seed_stats} entry, mean ± std [95% interval]."""
    lines = ["| run | seeds | " + " | ".join(c[1] for c in SEED_COLUMNS) + " |",
             "|" + "---|" * (len(SEED_COLUMNS) + 2)]
    for name, stats in rows.items():
        lines.append(f"| {name} | {stats['seeds']} | " + " | ".join(
            _stat(stats.get(key), show) for key, _, show in SEED_COLUMNS) + " |")
    return lines


def goals_lines(table: list) -> list:
    """Markdown lines: each goal with its mean, interval, threshold and whether it is met."""
    lines = ["| goal | mean [95% interval] | threshold | met on the mean | whole interval |",
             "|---|---|---|---|---|"]
    for goal in table:
        show = _pct if goal["key"] == "control_ppl_change" else _acc
        ci = "" if goal["ci95"] is None else (f" [{show(goal['ci95'][0])}, "
                                              f"{show(goal['ci95'][1])}]")
        lines.append(f"| {goal['goal']} | {show(goal['mean'])}{ci} | {goal['sense']} "
                     f"{show(goal['threshold'])} | {'yes' if goal['met'] else 'no'} | "
                     f"{'yes' if goal['met_by_whole_interval'] else 'no'} |")
    return lines


def summary_sections(summary: dict) -> list:
    """Markdown lines: seeds and intervals, goals, method variants, frame cross-validation and
    the QLoRA bar (from the experiment's summary.json)."""
    lines = ["### Seeds and 95% intervals", "",
             f"Mean ± sample std [95% interval] over seeds. Interval: {summary['interval_note']}. "
             "Test frames for irregular/form choice/regular; new shapes are frames the corpus "
             "never uses.", ""] + seeds_table(summary["seeds"])
    lines += ["", "### Goals (LoRA r = 8, mean over seeds)", ""]
    lines += goals_lines(summary["goals"]["lora_r8"])
    methods = summary["methods"]
    lines += ["", "### Method variants for the goals", "",
              "| variant | changes | validation-frame irregular | " +
              " | ".join(c[1] for c in SEED_COLUMNS[:6]) + " |", "|" + "---|" * 9]
    for name in methods["order"]:
        entry = methods["variants"][name]
        lines.append(f"| {name} | {json.dumps(entry['changes'])} | "
                     f"{_stat(entry['validation_irregular_accuracy_tuned'])} | " + " | ".join(
                         _stat(entry.get(key), show) for key, _, show in SEED_COLUMNS[:6]) + " |")
    chosen = summary["goals"]["chosen_method"]
    lines += ["", f"Chosen by validation: **{methods['chosen']}** (rule: {methods['rule']}). "
              "Its goals:", ""] + goals_lines(chosen["table"])
    cv = summary.get("frame_cv")
    if cv:
        lines += ["", "### Frame cross-validation (LoRA r = 8)", "", f"{cv['note']}.", "",
                  "| fold | test frames | validation frames | seeds | irregular | form choice | "
                  "control ppl change |", "|---|---|---|---|---|---|---|"]
        for fold, entry in cv["folds"].items():
            lines.append(f"| {fold} | {', '.join(entry['test_frames'])} | "
                         f"{', '.join(entry['validation_frames'])} | {entry['seeds']} | "
                         f"{_stat(entry['irregular_accuracy'])} | "
                         f"{_stat(entry['form_choice_accuracy'])} | "
                         f"{_stat(entry['control_ppl_change'], _pct)} |")
        lines += ["", f"Mean over folds: irregular {_stat(cv['irregular_accuracy_mean'])}, "
                  f"form choice {_stat(cv['form_choice_accuracy_mean'])}; worst fold "
                  f"{cv['worst_fold']} (irregular {_acc(cv['worst_irregular_accuracy'])})."]
    q = summary["qlora"]
    bar = q["course_bar"]
    lines += ["", "### QLoRA against the course's bar", "",
              f"One epoch at batch {q['batch_size']}, replay {q['replay']:g}, KL {q['kl']:g}, "
              f"lr {q['lr']:g}: irregular gain {_stat(q['irregular_gain_seeds'], _pct)} points "
              f"(fraction x 100), control ppl change "
              f"{_stat(summary['seeds']['qlora']['control_ppl_change'], _pct)}; bar (gain >= "
              f"+10 points, change <= +5% on the mean): "
              f"**{'met' if bar['met_on_mean'] else 'not met'}**.", ""]
    return lines


def transformers_section(runs: list, rel) -> list:
    """Markdown lines: one row per transformers fine-tuning run, and its command."""
    lines = ["## Transformers runs", "",
             "| run | base | method | r | alpha | steps | final loss | best val loss (step) | "
             "best val ppl | trainable | target tokens/s | wall s |", "|" + "---|" * 12]
    commands = []
    for run in runs:
        res, config = _load(run / "results.json"), _load(run / "config.json")
        base = (config.get("base") or {}).get("path", "?")
        best = res.get("best_val_loss")
        best_text = "n/a" if best is None else f"{best:.4f} ({res.get('best_step')})"
        trainable = res.get("trainable_params")
        lines.append(
            f"| {rel(run)} | {Path(base).name} | {res.get('method')} | {res.get('rank')} | "
            f"{_num(res.get('alpha'), 'g')} | {res.get('steps')} | "
            f"{_num(res.get('final_loss'))} | {best_text} | {_num(res.get('best_val_ppl'))} | "
            f"{'n/a' if trainable is None else f'{trainable:,}'} | "
            f"{_num(res.get('target_tokens_per_s'), '.1f')} | {_num(res.get('wall_s'), '.1f')} |")
        commands.append(hf_command_of(run, config))
    return lines + ["", "Commands:", ""] + [f"- `{c}`" for c in commands] + [""]


def hf_command_of(run_dir: Path, config: dict) -> str:
    """The ``minituner finetune`` command of a transformers run (from its config.json)."""
    ft = config.get("finetune") or {}
    base = (config.get("base") or {}).get("path", ft.get("model", "?"))
    parts = [f"minituner finetune --model hf:{base} --data {ft.get('data')}",
             f"--method {ft.get('method')} --rank {ft.get('rank')} --alpha {ft.get('alpha')}"]
    parts.append(f"--epochs {ft['epochs']:g}" if ft.get("epochs") else f"--steps {ft.get('steps')}")
    parts.append(f"--batch-size {ft.get('batch_size')} --lr {ft.get('lr')} --seed {ft.get('seed')} "
                 f"--out {run_dir}")
    return " ".join(parts)


def write_report(folders, out_path, transformers_runs=()) -> Path:
    """Write REPORT.md (and loss_curves.png beside it) for the given folders."""
    out_path = Path(out_path)
    transformers_runs = [Path(r) for r in transformers_runs]
    found = classify(folders)
    runs, sweeps = list(found["runs"]), list(found["sweeps"])
    variant_tables = list(found["variants"])
    for exp_dir in found["experiments"]:
        exp = _load(exp_dir / "experiment.json")
        names = [exp["runs"][k] for k in ("lora_r8", "full_ft", "qlora")]
        names += [v for k, v in exp["runs"]["ablation"].items() if k != "both"]
        runs += [exp_dir / n for n in names if (exp_dir / n) not in runs]
        sweeps.append(exp_dir / exp["runs"]["sweep"])
        if exp["runs"].get("variants"):
            variant_tables.append(exp_dir / exp["runs"]["variants"])

    def rel(path: Path) -> str:
        return os.path.relpath(path, out_path.parent)

    lines = ["# minituner fine-tuning report", "",
             "Every number below is read from the run folders' results.json, sweep.json and "
             "experiment.json. Accuracies are fractions of held-out probes answered correctly "
             "(irregular = past + participle probes of the test frames, never trained on); "
             "control perplexity is per token over whole regular-verb lines, <eos> included.", ""]
    for base in found["bases"]:
        res = _load(base / "results.json")
        lines += [f"Base {rel(base)}: validation perplexity {res['val_ppl']:.4f}, test "
                  f"{res['test_ppl']:.4f}, {res['params']:,} parameters.", ""]
    for exp_dir in found["experiments"]:
        lines += experiment_sections(exp_dir, rel)
        if (exp_dir / "summary.json").is_file():
            lines += summary_sections(_load(exp_dir / "summary.json"))
    if runs or transformers_runs:
        logs = {rel(r): [json.loads(x) for x in (r / "train_log.jsonl").read_text().splitlines()]
                for r in runs + transformers_runs}
        plot_loss_curves(logs, out_path.parent / "loss_curves.png")
    if transformers_runs:
        lines += transformers_section(transformers_runs, rel)
        if not runs:
            lines += ["![loss curves](loss_curves.png)", ""]
    if runs:
        lines += ["## Runs", ""] + runs_table(runs, rel) + ["", "### Accuracy per probe slice",
                                                             ""] + slices_table(runs, rel)
        lines += tense_table(runs, rel)
        lines += ["", "### Training-state memory (exact tensor bytes)", ""]
        lines += bytes_table(runs, rel) + ["", "### Loss curves", "",
                                          "![loss curves](loss_curves.png)", ""]
    for sweep_dir in sweeps:
        lines += sweep_section(sweep_dir, rel)
    for variants_dir in variant_tables:
        lines += variants_section(variants_dir, rel)
    for run in runs:
        if "qlora" in _load(run / "results.json"):
            lines += qlora_section(run, rel)
    if runs:
        lines += ["## Commands", ""] + [f"- `{command_of(r)}`" for r in runs] + [""]
    return atomic_write_text(out_path, "\n".join(lines))
