"""The committed phase-28 measurements that the quiz's results questions are checked against.

``docs/results/phase-28.json`` is written by the fine-tuning experiment and ships with the
package (:mod:`minituner.quiz.locations`). The quiz reads only these keys (others are allowed
and ignored)::

    {
      "command": "<the exact command that produced the file>",
      "seed": 0,
      "lora_r8": {"control_ppl_change": 0.021, "irregular_accuracy_tuned": 0.93},
      "full_ft": {"control_ppl_change": 0.12},
      "sweep": {
        "ranks": [2, 4, 8, 16, 32],
        "irregular_accuracy": [0.70, 0.85, 0.93, 0.94, 0.94],
        "control_ppl": [10.1, 10.2, 10.3, 10.3, 10.4],
        "elbow_rank": 8
      }
    }

``control_ppl_change`` is the relative change of perplexity on the regular-verb control set,
after / before - 1 (0.021 means +2.1%); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

from minituner.quiz.locations import default_results_path
from minituner.util.files import read_json

SWEEP_RANKS = [2, 4, 8, 16, 32]
CONTROL_PPL_BAR = 0.05  # the course's bar: control perplexity up by at most 5%


def load_results(root: str | Path | None = None) -> dict:
    """Read and validate the results file of checkout ``root`` (None: the package's copy)."""
    return read_results(default_results_path(root))


def read_results(path: str | Path) -> dict:
    """Read and validate a results file; a missing file or key is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: results file missing (written by the phase-28 experiment)"
        )
    data = read_json(path, what="results file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    try:
        _validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return data


def _validate(data: dict) -> None:
    _require(data, "command", str)
    _require(data, "seed", int)
    for section in ("lora_r8", "full_ft", "sweep"):
        _require(data, section, dict)
    _fraction_change(data, "lora_r8", "control_ppl_change")
    _fraction(data["lora_r8"], "lora_r8.irregular_accuracy_tuned")
    _fraction_change(data, "full_ft", "control_ppl_change")
    _sweep(data["sweep"])


def _require(mapping: dict, key: str, kind: type, where: str = "") -> object:
    name = f"{where}.{key}" if where else key
    if key not in mapping:
        raise ValueError(f"missing key '{name}'")
    value = mapping[key]
    if kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int)
        ok = ok and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"'{name}' must be {kind.__name__}, got {value!r}")
    return value


def _fraction_change(data: dict, section: str, key: str) -> None:
    value = _require(data[section], key, float, section)
    if value <= -1:
        raise ValueError(f"'{section}.{key}' must be > -1, got {value!r}")


def _fraction(mapping: dict, name: str) -> None:
    section, key = name.split(".")
    value = _require(mapping, key, float, section)
    if not 0 <= value <= 1:
        raise ValueError(f"'{name}' must be a fraction in [0, 1]")


def _sweep(sweep: dict) -> None:
    ranks = _require(sweep, "ranks", list, "sweep")
    if ranks != SWEEP_RANKS:
        raise ValueError(f"'sweep.ranks' must be {SWEEP_RANKS}, got {ranks}")
    for key in ("irregular_accuracy", "control_ppl"):
        values = _require(sweep, key, list, "sweep")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != len(ranks) or not numbers:
            raise ValueError(
                f"'sweep.{key}' must hold {len(ranks)} numbers, one per rank"
            )
    if not all(0 <= v <= 1 for v in sweep["irregular_accuracy"]):
        raise ValueError("'sweep.irregular_accuracy' must be fractions")
    elbow = _require(sweep, "elbow_rank", int, "sweep")
    if elbow not in ranks:
        raise ValueError(f"'sweep.elbow_rank' {elbow} is not one of {ranks}")


def forgetting_options(results: dict) -> set:
    """True options of q-28-11 given the results (option order of the YAML).

    1: LoRA within the +5% bar and below full FT; 2: LoRA within the bar, full FT not above it;
    3: LoRA past the bar; 4: neither changed control perplexity at all.
    """
    lora = results["lora_r8"]["control_ppl_change"]
    full = results["full_ft"]["control_ppl_change"]
    conditions = [
        lora <= CONTROL_PPL_BAR and lora < full,
        lora <= CONTROL_PPL_BAR and full <= lora,
        lora > CONTROL_PPL_BAR,
        lora == 0 and full == 0,
    ]
    return {number for number, holds in enumerate(conditions, 1) if holds}


def sweep_options(results: dict) -> set:
    """True options of q-28-13 given the results (option order of the YAML).

    1: elbow at r <= 8; 2: elbow at r >= 16; 3: accuracy at r = 32 below r = 2; 4: flat curve.
    """
    sweep = results["sweep"]
    accuracy = sweep["irregular_accuracy"]
    conditions = [
        sweep["elbow_rank"] <= 8,
        sweep["elbow_rank"] >= 16,
        accuracy[-1] < accuracy[0],
        max(accuracy) - min(accuracy) < 1e-9,
    ]
    return {number for number, holds in enumerate(conditions, 1) if holds}
