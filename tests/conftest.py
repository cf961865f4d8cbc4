"""Shared fixtures: a tiny pretrained base run, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `minituner finetune` on the CPU fixes glibc's mmap threshold for the rest of its process; the
# CLI tests run in this one, so it keeps glibc's own (tests/cli/test_plan_cli.py checks the pin
# in a process of its own).
os.environ.setdefault("MINITUNER_MMAP_THRESHOLD", "glibc")
# Tiny models run fastest on one thread, and shared CI machines are noisy with more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory):
    """A short pretraining run folder (few steps; for plumbing, not for accuracy)."""
    from minituner.course.pretraining import run_pretraining
    from minituner.training.loop import PretrainConfig

    out = tmp_path_factory.mktemp("runs") / "base"
    run_pretraining(out, PretrainConfig(steps=30, eval_every=15, batch_size=16, seed=0))
    return out


@pytest.fixture(scope="session")
def toy_hf_model(tmp_path_factory):
    """toy_hf_model(arch="gpt2", seed=0) -> directory of a tiny random-init transformers model
    with the toy word-level tokenizer (written once per session per arguments)."""
    from minituner.hf.toy import write_toy_model

    root = tmp_path_factory.mktemp("hf_models")
    made = {}

    def make(arch: str = "gpt2", seed: int = 0):
        key = (arch, seed)
        if key not in made:
            made[key] = write_toy_model(root / f"{arch}-{seed}", arch=arch, seed=seed)
        return made[key]

    return make
