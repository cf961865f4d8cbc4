"""Crash-safe training state: atomic checkpoints, RNG capture, and the one writer of a run.

A checkpoint holds the trainable tensors, the optimizer and scheduler state, the RNG states,
the step, the log so far and the best-so-far trainable tensors, written atomically as
``checkpoints/step-000050.pt`` (a reader never sees half a file; a SIGKILL during the write
leaves the previous checkpoint intact). The newest ``keep`` checkpoints are kept. A newest
checkpoint that cannot be read (truncated or garbage) is skipped by
:func:`load_latest_checkpoint`, which falls back to the previous complete one and names what it
skipped; a checkpoint holding non-finite values is an error, never skipped.

:class:`RunWriter` is the only object the training loop writes through, so a distributed
launcher can make every write rank-0-only by passing ``enabled=False`` on the other ranks.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from minituner.util.files import atomic_write
from minituner.util.jsonl import write_jsonl

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
_NAME = re.compile(r"^step-(\d{6,})\.pt$")


def capture_rng() -> dict:
    """Python and torch RNG states (CUDA too when present)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`capture_rng` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(run_dir: str | Path) -> list:
    """(step, path) of the checkpoints in a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    steps = checkpoint_steps(run_dir)
    return steps[-1][1] if steps else None


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, garbage): a resume may skip it."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint, with a one-line error for a damaged file (:class:`UnreadableCheckpoint`)
    or a non-finite tensor (ValueError)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint ({type(exc).__name__})") \
            from None
    if not isinstance(state, dict) or "step" not in state or "trainable" not in state:
        raise UnreadableCheckpoint(f"{path}: not a minituner training checkpoint")
    _check_finite(path, state)
    return state


def load_latest_checkpoint(run_dir: str | Path) -> tuple:
    """(newest readable checkpoint's state or None, paths of the newer unreadable ones skipped),
    so a resume survives a checkpoint damaged by a crash; a ValueError when none is readable."""
    skipped = []
    for _, path in reversed(checkpoint_steps(run_dir)):
        try:
            return load_checkpoint(path), skipped
        except UnreadableCheckpoint:
            skipped.append(path)
    if skipped:
        names = ", ".join(p.name for p in skipped)
        raise ValueError(f"{Path(run_dir) / CHECKPOINT_DIR}: no readable checkpoint ({names} "
                         "damaged); --overwrite starts over")
    return None, skipped


def _named_tensors(state: dict) -> list:
    """(name, tensor) of the weights a checkpoint restores: trainable, best-step and optimizer."""
    named = [(f"trainable {k}", v) for k, v in state["trainable"].items()]
    best = (state.get("best") or {}).get("state") or {}
    named += [(f"best {k}", v) for k, v in best.items()]
    for index, slots in (state.get("optimizer") or {}).get("state", {}).items():
        named += [(f"optimizer state {index}.{k}", v) for k, v in slots.items()]
    return named


def _check_finite(path: Path, state: dict) -> None:
    """Refuse a checkpoint holding NaN/inf: resuming from it would train on garbage."""
    for name, tensor in _named_tensors(state):
        if torch.is_tensor(tensor) and tensor.is_floating_point() and \
                not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {name} holds non-finite values (NaN or inf); "
                             "the checkpoint cannot be resumed from")


class RunWriter:
    """Writes a run's checkpoints and train log; a disabled writer (rank > 0) writes nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.run_dir, self.enabled, self.keep = Path(run_dir), enabled, keep

    def latest(self) -> Path | None:
        """The newest checkpoint written so far."""
        return latest_checkpoint(self.run_dir)

    def save_checkpoint(self, state: dict) -> Path | None:
        """Atomically write ``state`` as step-<step>.pt, then drop checkpoints of later steps
        (a damaged one a resume skipped) and those beyond ``keep``."""
        if not self.enabled:
            return None
        step = int(state["step"])
        path = self.run_dir / CHECKPOINT_DIR / f"step-{step:06d}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        found = checkpoint_steps(self.run_dir)
        for _, later in [(s, p) for s, p in found if s > step]:
            later.unlink(missing_ok=True)
        for _, old in [(s, p) for s, p in found if s <= step][: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def write_log(self, log: list) -> Path | None:
        """Rewrite train_log.jsonl with every record so far (atomic, small)."""
        if not self.enabled:
            return None
        return write_jsonl(self.run_dir / LOG_FILE, log)

    def write(self, write_fn, *args, **kwargs) -> object:
        """Call ``write_fn(*args, **kwargs)`` on the writing rank only; returns its result."""
        if not self.enabled:
            return None
        return write_fn(*args, **kwargs)
