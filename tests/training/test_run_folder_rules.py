"""training.runs: which folders --overwrite may replace, the unfinished/failed rules, and what a
--resume may change."""

from __future__ import annotations

import json

import pytest
import torch

from minituner.training.runs import (
    check_replaceable,
    discard_staging,
    mark_failed,
    minituner_folder,
    prepare_run_dir,
    publish_run,
    recorded_base_path,
    resume_differences,
    resume_state,
    run_status,
    with_relative_base,
)

CONFIG = {"format": 1, "kind": "finetune", "finetune": {"lr": 0.01, "steps": 10, "threads": 1}}


def write_run(folder, config=CONFIG, finished=False, checkpoint_step=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if finished:
        (folder / "results.json").write_text("{}")
    if checkpoint_step is not None:
        (folder / "checkpoints").mkdir(exist_ok=True)
        torch.save({"step": checkpoint_step, "trainable": {}},
                   folder / "checkpoints" / f"step-{checkpoint_step:06d}.pt")
    return folder


def test_minituner_folder_recognises_runs_adapters_and_merged_models(tmp_path):
    assert minituner_folder(write_run(tmp_path / "run", finished=True)) == \
        "finished run folder (kind finetune)"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert minituner_folder(adapter) is None  # the weights are missing
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert minituner_folder(adapter) == "adapter folder"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge_report.json").write_text("{}")
    assert minituner_folder(merged) == "merged model folder"
    other = write_run(tmp_path / "other", {"kind": "thesis"})
    assert minituner_folder(other) is None  # a config.json of an unknown kind is not ours


def test_overwrite_refuses_a_users_folder_naming_what_it_holds(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    for call in (lambda: check_replaceable(folder),
                 lambda: prepare_run_dir(folder, CONFIG, overwrite=True),
                 lambda: prepare_run_dir(folder, CONFIG)):
        with pytest.raises(FileExistsError, match=r"holds thesis\.txt, not a run, adapter or "
                                                  r"merged model minituner wrote"):
            call()
    assert (folder / "thesis.txt").read_text() == "three years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_replaceable(tmp_path / "file")
    check_replaceable(tmp_path / "missing")  # nothing there: fine


def test_overwrite_trains_beside_the_old_run_and_publishes_the_finished_one(tmp_path):
    run = write_run(tmp_path / "run", {**CONFIG, "kind": "pretrain"}, finished=True)
    (run / "model.safetensors").write_bytes(b"old")
    work = prepare_run_dir(run, CONFIG, overwrite=True)
    assert work != run and work.parent == tmp_path and list(work.iterdir()) == []
    assert (run / "model.safetensors").read_bytes() == b"old"  # whole until the new one is done
    (work / "model.safetensors").write_bytes(b"new")
    publish_run(work, run)
    assert (run / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_stopped_replacement_leaves_the_old_run_and_no_staging(tmp_path):
    run = write_run(tmp_path / "run", {**CONFIG, "kind": "pretrain"}, finished=True)
    work = prepare_run_dir(run, CONFIG, overwrite=True)
    (work / "config.json").write_text("{}")
    discard_staging(work, run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert json.loads((run / "config.json").read_text())["kind"] == "pretrain"


def test_a_staging_folder_left_by_a_kill_goes_at_the_next_command(tmp_path):
    run = write_run(tmp_path / "run", finished=True)
    work = prepare_run_dir(run, CONFIG, overwrite=True)
    (work / "config.json").write_text("{}")  # killed while training: the staging stays
    assert prepare_run_dir(run, CONFIG) == run  # the same finished run may be reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_of_an_empty_or_missing_folder_trains_in_place(tmp_path):
    assert prepare_run_dir(tmp_path / "new", CONFIG, overwrite=True) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", CONFIG, overwrite=True) == tmp_path / "empty"


def test_run_config_records_its_base_relative_to_the_run(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"w")
    config = with_relative_base({"base": {"path": str(base)}}, tmp_path / "runs" / "ft")
    assert config["base"]["relative_path"] == "../../models/base"
    moved = tmp_path / "moved"
    (moved / "runs" / "ft").mkdir(parents=True)
    (moved / "models").mkdir()
    base.rename(moved / "models" / "base")
    found = recorded_base_path(config, moved / "runs" / "ft", "model.safetensors")
    assert found == str((moved / "models" / "base").resolve())
    # nothing at the relative place: the recorded absolute path, as before
    assert recorded_base_path(config, tmp_path / "runs" / "ft", "model.safetensors") == str(base)
    with pytest.raises(ValueError, match="field 'base' missing"):
        recorded_base_path({}, tmp_path, "model.safetensors")


def test_no_verify_base_lets_a_resume_go_on_over_a_changed_base_with_a_warning(tmp_path):
    config = {**CONFIG, "base": {"path": "b", "fingerprint": "aaa"}}
    run = write_run(tmp_path / "run", config, checkpoint_step=None)
    changed = {**config, "base": {"path": "b", "fingerprint": "bbb"}}
    with pytest.raises(ValueError, match="base"):
        resume_state(run, changed)
    unverified = {**changed, "finetune": {**CONFIG["finetune"], "verify_base": False}}
    with pytest.warns(UserWarning, match="fingerprint differs"):
        assert resume_state(run, unverified) is None  # no checkpoint yet


def test_same_unfinished_run_with_checkpoints_is_refused_with_the_step_count(tmp_path):
    run = write_run(tmp_path / "run", checkpoint_step=20)
    assert run_status(run) == "unfinished"
    with pytest.raises(FileExistsError, match=r"20 steps done; pass --resume to continue or "
                                              r"--overwrite to start over"):
        prepare_run_dir(run, CONFIG)
    assert (run / "checkpoints" / "step-000020.pt").is_file()
    prepare_run_dir(write_run(tmp_path / "early"), CONFIG)  # killed before any checkpoint: reused
    prepare_run_dir(write_run(tmp_path / "done", finished=True), CONFIG)  # same run again


def test_a_failed_run_is_replaced_by_the_corrected_command(tmp_path):
    run = write_run(tmp_path / "run", checkpoint_step=5)
    other = {**CONFIG, "finetune": {**CONFIG["finetune"], "lr": 0.5}}
    with pytest.raises(FileExistsError, match="different run"):
        prepare_run_dir(run, other)  # an unfinished run that did not fail is kept
    mark_failed(run, ValueError("loss is nan at step 6"))
    assert run_status(run) == "failed"
    assert json.loads((run / "failed.json").read_text())["steps_done"] == 5
    prepare_run_dir(run, other)  # another --lr: the failed run goes without --overwrite
    assert list(run.iterdir()) == []


def test_resume_may_change_threads_and_a_larger_step_count_only(tmp_path):
    def changed(**values):
        return {**CONFIG, "finetune": {**CONFIG["finetune"], **values}}

    assert resume_differences(CONFIG, changed(threads=4)) == []
    assert resume_differences(CONFIG, changed(steps=20)) == []
    assert resume_differences(CONFIG, changed(steps=5)) == [("finetune.steps", 10, 5)]
    assert resume_differences(CONFIG, changed(steps=None, epochs=2.0)) == [
        ("finetune.epochs", None, 2.0), ("finetune.steps", 10, None)]
    assert resume_differences(CONFIG, {**changed(lr=0.1), "base": "other"}) == [
        ("base", None, "other"), ("finetune.lr", 0.01, 0.1)]
    run = write_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"cannot change finetune\.lr: run 0\.01, now 0\.1 "
                                         r"\(a resume may change only threads"):
        resume_state(run, changed(lr=0.1))
    assert resume_state(run, changed(steps=40, threads=2)) is None  # no checkpoint yet


def test_a_failed_pretraining_run_is_replaced_by_a_retry_with_another_lr(tmp_path):
    from minituner.course.pretraining import run_pretraining
    from minituner.training.config import PretrainConfig

    out = tmp_path / "base"

    def diverge(record):
        if record["step"] == 4:
            raise ValueError("loss is inf at step 4")

    cfg = PretrainConfig(steps=6, eval_every=3, batch_size=8, seed=1)
    with pytest.raises(ValueError, match="inf"):
        run_pretraining(out, cfg, on_step=diverge)
    assert run_status(out) == "failed"
    results = run_pretraining(out, PretrainConfig(steps=6, eval_every=3, batch_size=8, seed=1,
                                                  lr=1e-3))
    assert results["steps"] == 6 and run_status(out) == "finished"
    assert not (out / "failed.json").exists()
