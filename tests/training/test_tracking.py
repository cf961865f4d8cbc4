"""--report-to tensorboard: event files in the run folder with the fields train_log.jsonl holds;
the console states the run's size before step 1."""

from __future__ import annotations

import json

import pytest
from hf_helpers import write_data

from minituner.cli import main
from minituner.training.tracking import TAGS, check_trackers, scalars

LOGGED = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_token_accuracy")


def _finetune(toy_hf_model, tmp_path, *flags):
    data = write_data(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    code = main(["finetune", "--model", f"hf:{toy_hf_model('llama')}", "--data", str(data),
                 "--out", str(run), "--val-fraction", "0.25", "--steps", "4", "--eval-every", "2",
                 "--batch-size", "4", "--rank", "2", *flags])
    assert code == 0
    return run


def test_tensorboard_event_files_hold_the_log_fields(toy_hf_model, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _finetune(toy_hf_model, tmp_path, "--report-to", "tensorboard")
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "effective batch 4" in out and "steps 4" in out
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    for field in LOGGED:
        assert field in log[-1], field
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {TAGS[f] for f in LOGGED} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx([r["loss"] for r in log])
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_without_report_to_no_tracker_files(toy_hf_model, tmp_path):
    run = _finetune(toy_hf_model, tmp_path)
    assert not (run / "tensorboard").exists()


def test_scalars_keep_finite_tagged_numbers():
    assert scalars({"step": 1, "loss": 2.0, "lr": 0.1, "other": 3.0, "val_loss": float("nan")}) \
        == {"train/loss": 2.0, "train/learning_rate": 0.1}


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_trackers_refused_by_name_when_absent(name):
    try:
        __import__(name)
    except ImportError:
        with pytest.raises(ValueError, match=f"--report-to {name} needs"):
            check_trackers([name])
    else:
        pytest.skip(f"{name} is installed")


@pytest.mark.parametrize("name, folder", [("wandb", "wandb"), ("mlflow", "mlruns")])
def test_optional_trackers_write_offline_when_installed(name, folder, tmp_path):
    pytest.importorskip(name)
    from minituner.training.tracking import make_tracker

    tracker = make_tracker([name], tmp_path, {"lr": 0.1})
    tracker.log({"step": 1, "loss": 2.0, "lr": 0.1})
    tracker.close()
    assert any((tmp_path / folder).rglob("*"))
