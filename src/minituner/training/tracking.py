"""Experiment trackers: the training loop's log records sent to TensorBoard, W&B or MLflow.

``--report-to tensorboard`` writes TensorBoard event files under ``RUN/tensorboard``; W&B and
MLflow run in their offline / local-file modes (``RUN/wandb``, ``RUN/mlruns``) and only when
their package is installed. Every tracker gets the same fields ``train_log.jsonl`` holds; the
tags name them as TRL's trainer does (``train/loss``, ``train/learning_rate``, ``eval/loss`` ...).
The packages are optional and imported where used.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from minituner.training.config import TRACKERS

__all__ = ["TAGS", "MultiTracker", "check_trackers", "make_tracker", "scalars"]

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

# log record field -> tracker tag
TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_second",
    "target_tokens": "train/target_tokens",
    "val_loss": "eval/loss",
    "val_ppl": "eval/perplexity",
    "val_token_accuracy": "eval/token_accuracy",
}


def scalars(record: dict) -> dict:
    """{tag: value} of a log record's finite numbers that have a tag."""
    return {tag: float(record[key]) for key, tag in TAGS.items()
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])}


class TensorBoardTracker:
    """Event files under ``directory`` (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--report-to tensorboard needs the tensorboard package "
                             "(pip install 'minituner[track]')") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, record: dict) -> None:
        """Add the record's scalars at its step."""
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbTracker:
    """A W&B run in offline mode, its files under ``directory``."""

    def __init__(self, directory: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError("--report-to wandb needs the wandb package") from None
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(directory), config=config)

    def log(self, record: dict) -> None:
        """Log the record's scalars at its step."""
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the local file store ``directory``."""

    def __init__(self, directory: Path, config: dict):
        try:
            import mlflow
        except ImportError:
            raise ValueError("--report-to mlflow needs the mlflow package") from None
        self.mlflow = mlflow
        mlflow.set_tracking_uri(directory.resolve().as_uri())
        mlflow.start_run()
        mlflow.log_params({k: str(v) for k, v in config.items()})

    def log(self, record: dict) -> None:
        """Log the record's scalars at its step ('/' becomes '_' in MLflow's names)."""
        metrics = {tag.replace("/", "_"): v for tag, v in scalars(record).items()}
        self.mlflow.log_metrics(metrics, step=record["step"])

    def close(self) -> None:
        """End the run."""
        self.mlflow.end_run()


class MultiTracker:
    """Several trackers fed as one (none: a tracker that does nothing)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        """Send one log record to every tracker."""
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """Close every tracker."""
        for tracker in self.trackers:
            tracker.close()


def check_trackers(report_to: list | None) -> None:
    """Refuse, before anything is written, a tracker that is unknown or not installed."""
    for name in report_to or ():
        if name not in TRACKERS:
            raise ValueError(f"--report-to must be among {list(TRACKERS)}, got {name!r}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ValueError(f"--report-to {name} needs the {_PACKAGES[name]} package, which is "
                             "not installed")


def make_tracker(report_to: list | None, run_dir, config: dict) -> MultiTracker:
    """The trackers ``report_to`` names, writing under the run folder ``run_dir``."""
    run_dir, trackers = Path(run_dir), []
    for name in dict.fromkeys(report_to or ()):
        if name not in TRACKERS:
            raise ValueError(f"--report-to must be among {list(TRACKERS)}, got {name!r}")
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir / "wandb", config))
        else:
            trackers.append(MlflowTracker(run_dir / "mlruns", config))
    return MultiTracker(trackers)
