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
    assert started == [{"steps": 6, "resumed_from": None, "what": "tiny", "trainable_params": 272,
                        "examples": 20, "tokens": 120, "epochs": 1.2, "effective_batch": 4}]
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


def test_a_failed_run_does_not_block_the_corrected_command(tmp_path):
    out = tmp_path / "run"

    def diverge(record):
        if record["step"] == 3:
            raise ValueError("loss is nan at step 3")

    with pytest.raises(ValueError, match="nan"):
        pipeline.run_finetune(TinyBackend(), settings(lr=50.0), out, on_step=diverge)
    failed = json.loads((out / "failed.json").read_text())
    assert failed == {"error": "ValueError: loss is nan at step 3", "steps_done": 2}
    retried = pipeline.run_finetune(TinyBackend(), settings(lr=5e-3), out)  # no --overwrite
    assert retried["steps"] == 6 and not (out / "failed.json").exists()
    assert json.loads((out / "config.json").read_text())["finetune"]["lr"] == 5e-3
    with pytest.raises(ValueError, match="nan"):  # the same command again after a failure
        pipeline.run_finetune(TinyBackend(), settings(lr=50.0), tmp_path / "same",
                              on_step=diverge)
    assert pipeline.run_finetune(TinyBackend(), settings(lr=50.0), tmp_path / "same")


def test_a_refused_setting_leaves_no_folder(tmp_path):
    class Refusing(TinyBackend):
        def build_trainable(self, cfg):
            raise ValueError("--targets: no layer matches 'nothing'")

    with pytest.raises(ValueError, match="--targets"):
        pipeline.run_finetune(Refusing(), settings(), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_may_raise_the_step_count_and_recomputes_the_schedule(tmp_path):
    def crash(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed: not marked failed, resumable
        pipeline.run_finetune(TinyBackend(), settings(), tmp_path / "run", on_step=crash)
    assert not (tmp_path / "run" / "failed.json").exists()
    with pytest.raises(ValueError, match=r"cannot change finetune\.steps: run 6, now 3"):
        pipeline.run_finetune(TinyBackend(), settings(steps=3), tmp_path / "run", resume=True)
    started = []
    pipeline.run_finetune(TinyBackend(), settings(steps=10), tmp_path / "run", resume=True,
                          on_start=started.append)
    assert started[0]["resumed_from"] == 4 and started[0]["steps"] == 10
    planned = pipeline.run_finetune(TinyBackend(), settings(steps=10), tmp_path / "planned")
    assert planned["steps"] == 10

    def lrs(name):
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["lr"] for line in lines]

    extended, whole = lrs("run"), lrs("planned")
    assert len(extended) == 10 and extended[4:] == whole[4:]  # the 10-step schedule from step 5
    assert extended[:4] != whole[:4]  # steps 1-4 ran on the 6-step schedule
