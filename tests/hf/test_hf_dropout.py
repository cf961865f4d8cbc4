"""transformers runs with LoRA dropout: the same seed gives the same adapter bytes, and a run
resumed from a checkpoint ends on the bytes of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import write_data

from minituner.hf.finetune import run_hf_finetune
from minituner.lora.adapters import WEIGHTS_NAME
from minituner.training.config import FinetuneConfig


def config(model_dir, data, **overrides) -> FinetuneConfig:
    settings = {"model": f"hf:{model_dir}", "train_data": str(data), "val_fraction": 0.25,
                "steps": 6, "batch_size": 4, "lr": 1e-2, "eval_every": 2, "checkpoint_every": 2,
                "warmup": 0.0, "rank": 4, "dropout": 0.3}
    return FinetuneConfig.for_kind("hf", **{**settings, **overrides})


def adapter_bytes(run_dir) -> bytes:
    return (run_dir / "adapter" / WEIGHTS_NAME).read_bytes()


def disturb_global_rng() -> None:
    """Draw from the global RNGs, as other code in the process would: an unseeded run would
    then see other dropout masks."""
    torch.rand(17)
    torch.randn(5, 5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_hf_model):
    """Two uninterrupted runs with dropout, one without, and one killed at step 5 and resumed
    (each after the global RNG was disturbed)."""
    root = tmp_path_factory.mktemp("dropout")
    model_dir = toy_hf_model("gpt2")
    data = write_data(root / "data.jsonl", n=30, seed=3)
    cfg = config(model_dir, data)
    for name in ("first", "second"):
        disturb_global_rng()
        run_hf_finetune(cfg, root / name, device="cpu")
    run_hf_finetune(config(model_dir, data, dropout=0.0), root / "no_dropout", device="cpu")

    def crash(record):
        if record["step"] == 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint

    disturb_global_rng()
    with pytest.raises(KeyboardInterrupt):
        run_hf_finetune(cfg, root / "resumed", on_step=crash, device="cpu")
    disturb_global_rng()
    results = run_hf_finetune(cfg, root / "resumed", resume=True, device="cpu")
    assert results["resumed_from_step"] == 4
    return root


def test_dropout_acts_on_the_adapter(runs):
    assert adapter_bytes(runs / "first") != adapter_bytes(runs / "no_dropout")


def test_same_seed_same_adapter_bytes_with_dropout(runs):
    assert adapter_bytes(runs / "first") == adapter_bytes(runs / "second")
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tokens_per_s")}
             for line in (runs / name / "train_log.jsonl").read_text().splitlines()]
            for name in ("first", "second")]
    assert len(logs[0]) == 6 and logs[0] == logs[1]  # every step's loss, not only the end


def test_resume_with_dropout_gives_the_uninterrupted_bytes(runs):
    assert adapter_bytes(runs / "resumed") == adapter_bytes(runs / "first")
