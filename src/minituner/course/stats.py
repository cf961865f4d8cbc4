"""Summaries over seeds: mean, sample standard deviation and a 95% t-interval.

The interval is Student's t over the per-seed values: mean +- t(0.975, n - 1) * std / sqrt(n),
with the sample standard deviation (n - 1). It treats each seed's figure as one draw (the
probes are fixed), so it says how much a figure moves with the seed (LoRA init, data order,
dropout), not how it would move on other probes.
"""

from __future__ import annotations

import math

INTERVAL_NOTE = ("95% t-interval over seeds: mean +- t(0.975, n-1) * s / sqrt(n), s the sample "
                 "standard deviation (n - 1); probes fixed, seeds vary")
# Two-sided 95% critical values of Student's t, t(0.975, df), df = 1..30.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """t(0.975, df): the 95% two-sided critical value (the normal 1.960 above df 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.960


def summarise(values: list) -> dict:
    """{"values", "n", "mean", "std", "ci95"} of per-seed values (std and ci95 None for n < 2)."""
    if not values:
        raise ValueError("summarise needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"values": list(values), "n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1) * std / math.sqrt(n)
    return {"values": list(values), "n": n, "mean": mean, "std": std,
            "ci95": [mean - half, mean + half]}
