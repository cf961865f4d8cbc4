"""One fine-tuning pipeline for every model kind: :func:`run_finetune` with a backend.

The pipeline owns what every run shares: settings validation, config.json (``"format"``, the
model kind and the whole :class:`minituner.training.config.FinetuneConfig`), --resume (one
path: a run whose settings differ is refused by name), the run folder rules, the batches
(:class:`minituner.training.sampling.MixedBatches`), optimizer, schedule,
:func:`minituner.training.loop.fit`, the manifest, log, plot and results.json. A backend
(:class:`FinetuneBackend`) adds what one kind of model needs: loading the base and the data,
the trainable model, its loss and validation, the evaluation before and after, and saving the
trained result. The Mini-GPT backend lives in :mod:`minituner.course.finetune`, the
transformers one in :mod:`minituner.hf.finetune`; the CLI chooses between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from minituner.training import distributed as D
from minituner.training.checkpoint import RunWriter
from minituner.training.config import HF_PREFIX, FinetuneConfig
from minituner.training.loop import (
    FitResult,
    LoopConfig,
    build_optimizer,
    build_scheduler,
    fit,
    seed_everything,
    total_steps,
    warmup_steps_of,
)
from minituner.training.packing import unpack_rows
from minituner.training.runs import (
    RESULTS_FILE,
    RUN_FORMAT,
    clear_checkpoints,
    discard_staging,
    mark_failed,
    prepare_run_dir,
    publish_run,
    resume_state,
    run_status,
    run_work_dir,
    with_relative_base,
)
from minituner.training.sampling import MixedBatches
from minituner.training.tracking import MultiTracker, check_trackers, make_tracker
from minituner.util.files import (
    atomic_write_json,
    check_out_apart,
    peak_rss_bytes,
    read_json,
    run_manifest,
)
from minituner.util.jsonl import write_jsonl
from minituner.util.plots import plot_loss

__all__ = ["FinetuneBackend", "Prepared", "TrainedRun", "run_config", "run_finetune"]


@dataclass
class Prepared:
    """A backend's encoded data and what config.json records about the base and the data."""

    train: list  # encoded training sequences ({"ids", "mask"})
    validation: list  # encoded validation sequences (may be empty)
    pad_id: int
    identity: dict  # config.json fields that decide the run: base, data hash, ...
    replay: list = field(default_factory=list)  # replay sequences (KL-flagged rows)
    files: dict = field(default_factory=dict)  # data/NAME.jsonl -> records written to the run


@dataclass
class TrainedRun:
    """What the results of a finished run are computed from."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    batches: MixedBatches
    fit: FitResult
    steps: int
    dist: D.DistInfo


class FinetuneBackend(Protocol):
    """What one kind of model adds to :func:`run_finetune` (called in this order)."""

    run_kind: str  # config.json "kind"

    def setup(self, cfg: FinetuneConfig) -> D.DistInfo:
        """Devices and processes; returns where this process stands."""

    def prepare(self, cfg: FinetuneConfig) -> Prepared:
        """Load the base and read, split and encode the data."""

    def evaluate_before(self, cfg: FinetuneConfig) -> None:
        """Evaluate the base before training (kept for :meth:`results`)."""

    def build_trainable(self, cfg: FinetuneConfig) -> nn.Module:
        """The model to train (adapters applied or the base unfrozen), after seeding."""

    def loss_fn(self, cfg: FinetuneConfig, model: nn.Module) -> Callable:
        """loss_fn(model, batch) -> (summed token loss, token count)."""

    def validator(self, cfg: FinetuneConfig, prepared: Prepared) -> Callable | None:
        """evaluate(model) -> {"val_loss", ...}, or None without validation data."""

    def start_info(self) -> dict:
        """Settings to report when training starts (device, dtype, ...)."""

    def on_step(self, model: nn.Module, record: dict) -> None:
        """Checks after each step (before the caller's ``on_step``)."""

    def results(self, cfg: FinetuneConfig, run: TrainedRun) -> dict:
        """results.json of the run (evaluation after training included)."""

    def save(self, cfg: FinetuneConfig, model: nn.Module, out: Path) -> None:
        """Write the trained result (adapter, or model) into the run folder."""

    def manifest_fields(self) -> dict:
        """manifest.json fields beyond the seed and the data files (the base, ...)."""

    def plot_title(self, cfg: FinetuneConfig) -> str:
        """Title of loss.png."""


def run_config(backend: FinetuneBackend, cfg: FinetuneConfig, prepared: Prepared) -> dict:
    """config.json: the format, the model kind, every setting and what decides the run."""
    return {"format": RUN_FORMAT, "kind": backend.run_kind, "model_kind": cfg.kind,
            "method": cfg.method, "finetune": cfg.to_dict(), **prepared.identity}


def _write_data(out: Path, prepared: Prepared) -> None:
    for name, records in prepared.files.items():
        write_jsonl(out / "data" / f"{name}.jsonl", records)


def _start_run_folder(out: Path, config: dict, prepared: Prepared, fresh: bool,
                      overwrite: bool) -> None:
    work = out
    if fresh:
        work = prepare_run_dir(out, config, overwrite)
        clear_checkpoints(work)
    atomic_write_json(work / "config.json", config)
    _write_data(work, prepared)


def check_inputs_apart(cfg: FinetuneConfig, out_dir) -> None:
    """Refuse an ``out_dir`` equal to, inside or containing the base model or the data."""
    base_flag = "--model" if cfg.kind == "hf" else "--base"
    base = cfg.model.removeprefix(HF_PREFIX) if isinstance(cfg.model, str) else None
    check_out_apart(out_dir, {base_flag: base or None, "--train-data": cfg.train_data,
                              "--val-data": cfg.val_data})


def run_finetune(backend: FinetuneBackend, cfg: FinetuneConfig, out_dir, resume: bool = False,
                 overwrite: bool = False, on_step: Callable[[dict], None] | None = None,
                 on_start: Callable[[dict], None] | None = None,
                 writer_enabled: bool = True) -> dict:
    """Fine-tune with ``backend`` into the run folder ``out_dir``; returns the results.

    ``on_start(info)`` gets {"steps", "resumed_from", ...backend.start_info()} before training,
    ``on_step(record)`` each step's log record (the library never prints);
    ``writer_enabled=False`` makes this process write nothing. ``resume`` on a finished run
    trains nothing and returns its results.json with ``"already_complete": True``. A run that
    stops on an error is marked failed (``failed.json``), so the corrected command replaces it.
    With ``overwrite``, a folder that holds an old run stays whole while the new one trains in
    a staging folder beside it, and is replaced only by the finished run.
    """
    started = time.perf_counter()
    cfg.validate()
    check_trackers(cfg.report_to)
    out = Path(out_dir)
    check_inputs_apart(cfg, out)
    info = backend.setup(cfg)
    prepared = backend.prepare(cfg)
    config = with_relative_base(run_config(backend, cfg, prepared), out)
    D.barrier()  # every process reads the folder's old config before rank 0 touches it
    checkpoint = resume_state(out, config) if resume else None
    D.barrier()
    if resume and run_status(out) == "finished":
        return {**read_json(out / RESULTS_FILE), "already_complete": True}
    backend.evaluate_before(cfg)
    seed_everything(cfg.seed)
    # Everything that can still reject a setting (targets, rank 0, the batch split) runs
    # before the run folder is created or an old one is wiped.
    model = backend.build_trainable(cfg)
    batches = MixedBatches(prepared.train, prepared.replay,
                           (cfg.batch_size - cfg.replay_rows) // info.world_size,
                           cfg.replay_rows // info.world_size, cfg.seed, prepared.pad_id,
                           info.rank, info.world_size)
    steps = total_steps(cfg, batches.batches_per_epoch)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                loraplus_lr_ratio=cfg.loraplus_lr_ratio or 1.0)
    scheduler = build_scheduler(optimizer, steps, warmup_steps_of(cfg, steps),
                                kind=cfg.lr_scheduler or "cosine")
    loss_fn = backend.loss_fn(cfg, model)
    work = out if checkpoint is not None else run_work_dir(out, overwrite)
    D.barrier()  # every process has seen whether --out held something before it is touched
    writer = RunWriter(work, enabled=writer_enabled and info.is_main)
    writer.write(_start_run_folder, out, config, prepared, checkpoint is None, overwrite)
    D.barrier()
    if on_start is not None:
        on_start({"steps": steps, "resumed_from": checkpoint and checkpoint["step"],
                  **run_sizes(cfg, model, prepared, batches, steps), **backend.start_info()})
    tracker = writer.write(make_tracker, cfg.report_to, work, config["finetune"]) or \
        MultiTracker([])

    def step_hook(record: dict) -> None:
        backend.on_step(model, record)
        tracker.log(record)
        if on_step is not None:
            on_step(record)

    loop = LoopConfig(steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                      eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    try:
        result = fit(model, loss_fn, batches, optimizer, scheduler, loop,
                     evaluate=backend.validator(cfg, prepared), writer=writer,
                     on_step=step_hook, resume=checkpoint, reduce_count=D.reduce_count,
                     reduce_loss=D.reduce_float)
    except Exception as exc:
        tracker.close()
        writer.write(_stop_failed, work, out, exc)
        raise
    tracker.close()
    after_fit = getattr(backend, "after_fit", None)  # every process (FSDP gathers the adapter)
    if after_fit is not None:
        after_fit(cfg, model)
    results = backend.results(cfg, TrainedRun(model, optimizer, loss_fn, batches, result, steps,
                                              info))
    writer.write(backend.save, cfg, model, work)
    writer.write(_write_manifest, work, cfg, backend.manifest_fields())
    writer.write_log(result.log)
    writer.write(plot_loss, result.log, work / "loss.png", title=backend.plot_title(cfg))
    results["wall_s"] = time.perf_counter() - started
    results["peak_rss_bytes"] = peak_rss_bytes()
    writer.write(atomic_write_json, work / "results.json", results)
    writer.write(publish_run, work, out)
    D.barrier()
    return results


def run_sizes(cfg: FinetuneConfig, model: nn.Module, prepared: Prepared, batches: MixedBatches,
              steps: int) -> dict:
    """What a run is about to do, for the console before step 1: trainable parameters,
    examples, their tokens, epochs, steps and the effective batch (rows per optimizer step)."""
    examples = unpack_rows(prepared.train)  # a packed row holds several examples
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "examples": len(examples),
        "tokens": sum(len(seq["ids"]) if isinstance(seq, dict) else len(seq)
                      for seq in examples),
        "epochs": steps * cfg.grad_accum / max(1, batches.batches_per_epoch),
        "effective_batch": cfg.batch_size * cfg.grad_accum,
    }


def _stop_failed(work: Path, out: Path, error: BaseException) -> None:
    """A run in its own folder is marked failed; a replacement run's staging folder goes."""
    if work == out:
        mark_failed(out, error)
    else:
        discard_staging(work, out)


def _write_manifest(out: Path, cfg: FinetuneConfig, extra: dict) -> None:
    """manifest.json (hashes the data files, so only the writing process builds it)."""
    atomic_write_json(out / "manifest.json", run_manifest(
        cfg.seed, data_files={p.name: p for p in sorted((out / "data").glob("*.jsonl"))},
        **extra))
