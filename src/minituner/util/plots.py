"""PNG plots of training curves, written atomically (matplotlib's Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

from minituner.util.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(log: list, path: str | Path, title: str = "training loss") -> Path:
    """Plot train loss per step and validation loss where recorded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = [r["step"] for r in log if "loss" in r]
    ax.plot(steps, [r["loss"] for r in log if "loss" in r], lw=1, alpha=0.7, label="train")
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    result = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return result


def plot_loss_curves(logs: dict, path: str | Path, title: str = "fine-tuning loss") -> Path:
    """Train (thin) and validation (dots) loss of several runs on one chart, by run name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for index, (name, log) in enumerate(logs.items()):
        color = f"C{index % 10}"
        steps = [r["step"] for r in log if "loss" in r]
        ax.plot(steps, [r["loss"] for r in log if "loss" in r], lw=0.8, alpha=0.5, color=color)
        val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, color=color,
                label=f"{name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    result = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return result


def plot_sweep(sweep: dict, path: str | Path) -> Path:
    """Irregular accuracy and control perplexity against rank, trainable parameters on a
    second axis (the ranks are evenly spaced on the x axis)."""
    plt = _pyplot()
    ranks = sweep["ranks"]
    xs = list(range(len(ranks)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    stats = sweep.get("stats") or {}
    left.errorbar(xs, sweep["irregular_accuracy"], yerr=_interval_errors(sweep, stats,
                  "irregular_accuracy"), fmt="o-", color="C0", capsize=4,
                  label="irregular accuracy")
    if sweep.get("regular_accuracy"):
        left.errorbar(xs, sweep["regular_accuracy"], yerr=_interval_errors(
            sweep, stats, "regular_accuracy"), fmt="s--", color="C2", capsize=4,
            label="regular accuracy")
    left.set_ylim(0, 1.02)
    left.set_ylabel("accuracy (held-out frames)")
    right.errorbar(xs, sweep["control_ppl"], yerr=_interval_errors(sweep, stats, "control_ppl"),
                   fmt="o-", color="C3", capsize=4, label="control perplexity")
    right.set_ylabel("control perplexity")
    elbow = sweep.get("elbow_rank")
    for ax in (left, right):
        ax.set_xticks(xs, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r (0 = base)")
        ax.grid(alpha=0.3)
        if elbow in ranks:
            ax.axvline(ranks.index(elbow), color="grey", ls=":", lw=1)
        twin = ax.twinx()
        twin.bar(xs, sweep["trainable_params"], alpha=0.15, color="grey", width=0.5)
        twin.set_ylabel("trainable parameters (bars)")
        lines, labels = ax.get_legend_handles_labels()
        ax.legend(lines, labels, loc="lower right", fontsize=8)
    seeds = sweep.get("seeds")
    shown = f", mean over seeds {seeds}, bars: 95% t-interval" if stats and seeds else ""
    fig.suptitle(f"rank sweep (elbow r = {elbow}{shown})")
    fig.tight_layout()
    result = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return result


def _interval_errors(sweep: dict, stats: dict, metric: str):
    """Asymmetric error bars (below, above) from each rank's 95% interval; None without one."""
    if not stats:
        return None
    below, above = [], []
    for rank, mean in zip(sweep["ranks"], sweep[metric], strict=True):
        ci = stats.get(str(rank), {}).get(metric, {}).get("ci95")
        below.append(0.0 if ci is None else mean - ci[0])
        above.append(0.0 if ci is None else ci[1] - mean)
    return [below, above]


def plot_variants(summary: dict, path: str | Path) -> Path:
    """Mean and standard deviation over seeds of each adapter variant: irregular and regular
    accuracy, and the control perplexity change (error bars: one sample std)."""
    plt = _pyplot()
    names = list(summary.get("order") or summary["variants"])
    entries = [summary["variants"][n] for n in names]
    xs = list(range(len(names)))
    panels = (("irregular_accuracy", "irregular accuracy", 1.0),
              ("regular_accuracy", "regular accuracy", 1.0),
              ("control_ppl_change", "control perplexity change (%)", 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4), dpi=100)
    for ax, (metric, label, scale) in zip(axes, panels, strict=True):
        means = [scale * e[metric]["mean"] for e in entries]
        errors = [scale * (e[metric]["std"] or 0.0) for e in entries]
        ax.bar(xs, means, yerr=errors, capsize=4, color=[f"C{i}" for i in xs], alpha=0.8)
        ax.set_xticks(xs, names, rotation=30)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    seeds = entries[0]["seeds"] if entries else []
    fig.suptitle(f"adapter variants at r = 8: mean over seeds {seeds}, error bars one std")
    fig.tight_layout()
    result = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return result
