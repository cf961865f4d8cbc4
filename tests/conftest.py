"""Shared fixtures: a tiny pretrained base run, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory):
    """A short pretraining run folder (few steps; for plumbing, not for accuracy)."""
    from minituner.pretraining import run_pretraining
    from minituner.train import PretrainConfig

    out = tmp_path_factory.mktemp("runs") / "base"
    run_pretraining(out, PretrainConfig(steps=30, eval_every=15, batch_size=16, seed=0))
    return out
