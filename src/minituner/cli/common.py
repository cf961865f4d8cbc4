"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an int > 0."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a float >= 0."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _float(text: str) -> float:
    """A finite float: inf and nan are refused like any other non-number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None


def load_config_file(path: str | None) -> dict:
    """Read a YAML or JSON config file of flag values (flags given on the command line win)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config file not found")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"{file}: cannot parse config ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file}: config must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
