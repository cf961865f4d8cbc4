"""The generic fine-tuning pipeline with a minimal backend: config.json, resume, run folder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from minituner.models.minigpt import masked_token_nll
from minituner.training import pipeline
from minituner.training.config import FinetuneConfig
from minituner.training.distributed import DistInfo
from minituner.training.evaluation import make_validator
from minituner.util.files import atomic_write_json


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids):
        return self.head(self.embed(ids))


class TinyBackend:
    """Everything a backend must provide, for a two-layer model on random sequences."""

    run_kind = "finetune-test"

    def setup(self, cfg):
        return DistInfo()

    def prepare(self, cfg):
        generator = torch.Generator().manual_seed(1)
        seqs = [{"ids": torch.randint(1, 16, (6,), generator=generator).tolist(),
                 "mask": [True] * 5} for _ in range(24)]
        return pipeline.Prepared(seqs[:20], seqs[20:], 0, {"base": {"name": "tiny"}},
                                 files={"train": [{"ids": s["ids"]} for s in seqs[:20]]})

    def evaluate_before(self, cfg):
        self.evaluated = True

    def build_trainable(self, cfg):
        self.model = Tiny()
        return self.model

    def loss_fn(self, cfg, model):
        return lambda m, batch: masked_token_nll(m(batch["input_ids"]), batch["targets"],
                                                 batch["target_mask"])

    def validator(self, cfg, prepared):
        return make_validator(prepared.validation, prepared.pad_id)

    def start_info(self):
        return {"what": "tiny"}

    def on_step(self, model, record):
        pass

    def results(self, cfg, run):
        return {"steps": run.steps, "best_step": run.fit.best_step}

    def save(self, cfg, model, out):
        atomic_write_json(out / "weights.json",
                          {k: v.flatten().tolist() for k, v in model.state_dict().items()})

    def manifest_fields(self):
        return {"base": "tiny"}

    def plot_title(self, cfg):
        return "tiny"


def settings(**values) -> FinetuneConfig:
    base = {"steps": 6, "batch_size": 4, "replay": 0.0, "kl": 0.0, "eval_every": 2,
            "checkpoint_every": 2, "lr": 1e-2, "dropout": 0.0}
    return FinetuneConfig(**{**base, **values})


def test_run_folder_config_and_resume(tmp_path):
    started = []
    whole = pipeline.run_finetune(TinyBackend(), settings(), tmp_path / "whole",
                                  on_start=started.append)
    assert started == [{"steps": 6, "resumed_from": None, "what": "tiny"}]
    assert whole["steps"] == 6 and whole["wall_s"] > 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["format"] == 1 and config["kind"] == "finetune-test"
    assert config["model_kind"] == "minigpt" and config["finetune"] == settings().to_dict()
    for name in ("manifest.json", "results.json", "train_log.jsonl", "loss.png",
                 "data/train.jsonl", "weights.json"):
        assert (tmp_path / "whole" / name).is_file(), name

    def crash(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_finetune(TinyBackend(), settings(), tmp_path / "crashed", on_step=crash)
    resumed = pipeline.run_finetune(TinyBackend(), settings(threads=2), tmp_path / "crashed",
                                    resume=True)
    assert resumed["best_step"] == whole["best_step"]
    assert ((tmp_path / "whole" / "weights.json").read_text()
            == (tmp_path / "crashed" / "weights.json").read_text())
    with pytest.raises(ValueError, match=r"cannot change finetune\.lr: run 0\.01, now 0\.5; "
                                         r"finetune\.seed: run 0, now 3"):
        pipeline.run_finetune(TinyBackend(), settings(lr=0.5, seed=3), tmp_path / "crashed",
                              resume=True)


def test_a_newer_format_is_refused_by_file_and_field(tmp_path):
    out = tmp_path / "run"
    pipeline.run_finetune(TinyBackend(), settings(steps=2), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format": 2}))
    for resume in (True, False):
        with pytest.raises(ValueError, match=r"config\.json: field 'format' is 2"):
            pipeline.run_finetune(TinyBackend(), settings(steps=2), out, resume=resume)
