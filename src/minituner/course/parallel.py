"""Many fine-tuning runs on worker processes, with results that do not depend on scheduling.

Each run is seeded on its own (its config's seed) and runs with its config's thread count;
results come back in the order the jobs were given, whichever worker finished first. Workers
are started with ``spawn`` (a fresh interpreter each, no copied torch state). With one worker
the runs go one after another in this process, with per-step progress.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from minituner.course.finetune import ProgressSink, run_with_progress
from minituner.training.config import FinetuneConfig
from minituner.training.loop import NonFiniteLossError


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: its folder (relative to the experiment), config and frame split."""

    name: str
    cfg: FinetuneConfig
    frames: dict | None = None


def run_job(base_dir: str, out_dir: str, job: Job, progress: ProgressSink | None = None) -> dict:
    """Run one job into ``out_dir/job.name`` (each step reported to ``progress`` when given);
    a diverging loss gives {"diverged": message}."""
    torch.set_num_threads(job.cfg.threads)
    try:
        return run_with_progress(base_dir, Path(out_dir) / job.name, job.cfg, progress,
                                 overwrite=True, frames=job.frames)
    except NonFiniteLossError as exc:
        return {"diverged": str(exc)}


def run_jobs(base_dir, out_dir, jobs: list, workers: int = 1,
             progress: ProgressSink | None = None, on_run=None) -> dict:
    """{job name: results} of every job, in job order. ``on_run(name, results)`` reports each
    finished run (completion order); ``progress`` gets each step's record (one worker) or, with
    several, ``start(len(jobs))`` and ``on_step({"run", "done"})`` per finished run."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    base, out = str(base_dir), str(out_dir)
    done: dict = {}
    if workers == 1:
        for job in jobs:
            done[job.name] = run_job(base, out, job, progress)
            _report(on_run, job.name, done[job.name])
        return {job.name: done[job.name] for job in jobs}
    if progress is not None:
        progress.start(len(jobs))
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(run_job, base, out, job): job.name for job in jobs}
            for future in as_completed(futures):
                name = futures[future]
                done[name] = future.result()
                _report(on_run, name, done[name])
                if progress is not None:
                    progress.on_step({"run": name, "done": len(done)})
    finally:
        if progress is not None:
            progress.close()
    return {job.name: done[job.name] for job in jobs}


def _report(on_run, name: str, results: dict) -> None:
    if on_run is not None and "diverged" not in results:
        on_run(name, results)
