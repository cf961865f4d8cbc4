"""Built-in probe files, the sweep's elbow rule, and the whole experiment on a tiny base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minituner.course.evaluate import builtin_path
from minituner.course.probesets import builtin_sets
from minituner.course.sweep import elbow_rank, parse_ranks
from minituner.util.files import read_json
from minituner.util.jsonl import jsonl_text, read_jsonl


def test_committed_probe_files_are_what_the_generator_writes(tiny_base_run):
    # the tiny base's corpus is the seed-0 corpus, the one the committed files come from
    for name, records in builtin_sets(tiny_base_run / "corpus").items():
        committed = builtin_path(name).read_text(encoding="utf-8")
        assert committed == jsonl_text(records), name


def test_probes_hold_96_items_each_all_from_test_frames():
    from minituner.course.data import split_frames

    test_frames = set(split_frames()["test"])
    for name in ("irregular_past", "irregular_participle"):
        probes = read_jsonl(builtin_path(name))
        assert len(probes) == 96 and {p["frame"] for p in probes} <= test_frames


def test_elbow_rule():
    assert elbow_rank([0, 2, 4, 8, 16, 32], [0.1, 0.6, 0.85, 0.90, 0.905, 0.91]) == 8
    assert elbow_rank([0, 2, 4], [0.1, 0.9, 0.5]) == 2
    assert elbow_rank([0], [0.1]) is None
    assert parse_ranks("0,2, 4") == [0, 2, 4]
    for bad in ("0,-1", "a", "2,2", ""):
        with pytest.raises(ValueError, match="--ranks"):
            parse_ranks(bad)


@pytest.mark.slow
def test_tiny_experiment_writes_everything(tiny_base_run, tmp_path, capsys):
    from minituner.cli import main
    from minituner.quiz.results import load_results

    out, root = tmp_path / "exp", tmp_path / "checkout"
    results = root / "docs" / "results" / "phase-28.json"
    assert main(["experiment", "--base", str(tiny_base_run), "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--eval-every", "1", "--lr-grid", "1e-3",
                 "--qlora-epochs", "0.02", "--repeat-seeds", "1", "--method-seeds", "0,1",
                 "--framecv-seeds", "", "--variant-seeds", "0,1", "--workers", "1",
                 "--results-json", str(results)]) == 0
    for name in ("lora-r8", "full-ft", "qlora-r8", "ablation/none", "ablation/replay",
                 "ablation/kl", "sweep/r32", "sweep/r32-seed1", "seeds/seed1",
                 "full-seeds/seed1", "qlora-seeds/seed1", "methods/dropout-0/seed1"):
        assert (out / name / "results.json").is_file(), name
    sweep = read_json(out / "sweep" / "sweep.json")
    assert sweep["ranks"] == [0, 2, 4, 8, 16, 32] and sweep["seeds"] == [0, 1]
    assert sweep["trainable_params"] == [2304 * r for r in sweep["ranks"]]
    assert sweep["stats"]["8"]["irregular_accuracy"]["n"] == 2
    data = load_results(root)  # the quiz's reader accepts the file
    assert data["sweep"]["ranks"] == [2, 4, 8, 16, 32] and data["sweep"]["base"]["rank"] == 0
    assert len(data["sweep"]["irregular_accuracy_ci95"]) == 5
    lora = read_json(out / "lora-r8" / "results.json")
    for key in ("form_choice", "new_shape_irregular", "new_shape_regular", "spanish_irregular",
                "spanish_form_choice", "validation_irregular"):
        assert 0 <= lora[f"{key}_accuracy_tuned"] <= 1, key
        assert data["lora_r8"][f"{key}_accuracy_tuned"] == lora[f"{key}_accuracy_tuned"]
    assert "form-choice-past" in lora["slices_tuned"]
    assert data["lora_r8"]["control_ppl_change"] == lora["control_ppl_change"]
    seeds = data["seeds"]["lora_r8"]
    assert seeds["seeds"] == [0, 1] and seeds["irregular_accuracy_tuned"]["n"] == 2
    assert seeds["control_ppl_change"]["values"][0] == lora["control_ppl_change"]
    assert set(data["seeds"]) == {"lora_r8", "full_ft", "qlora"}
    assert "t-interval" in data["interval_note"]
    assert set(data["ablation"]) == {"none", "replay", "kl", "both"}
    assert data["ablation"]["kl"]["replay_nll"] == 0.0
    assert data["methods"]["order"][0] == "lora" and data["methods"]["chosen"] in data[
        "methods"]["order"]
    assert [g["key"] for g in data["goals"]["lora_r8"]][0] == "irregular_accuracy_tuned"
    assert data["frame_cv"] is None
    qlora = read_json(out / "qlora-r8" / "config.json")["finetune"]
    assert (qlora["batch_size"], qlora["replay"]) == (16, 0.75)
    assert "met_on_mean" in data["qlora"]["course_bar"]
    assert data["lora_r8_seeds"]["seeds"] == [0, 1]
    assert "minituner experiment" in data["command"] and data["seed"] == 0
    assert "--variant-seeds 0,1" in data["command"] and "--workers 1" in data["command"]
    variants = data["variants"]  # the plain-LoRA rows are the lora-r8 and seeds/ runs
    assert variants["order"] == ["lora", "dora", "pissa", "loraplus", "qlora", "loftq"]
    assert set(variants["variants"]) == set(variants["order"])
    assert variants["variants"]["lora"]["irregular_accuracy"]["values"] == [
        lora["irregular_accuracy_tuned"], data["lora_r8_seeds"]["irregular_accuracy_tuned"][1]]
    assert variants["variants"]["dora"]["trainable_params"] > lora["trainable_params"]
    assert "runs" not in variants["variants"]["lora"] and "vs_lora" in variants
    assert not (out / "variants" / "lora").exists()
    assert (out / "variants" / "loftq" / "seed1" / "results.json").is_file()
    report = (out / "REPORT.md").read_text()
    for heading in ("Learning-rate search", "Anti-forgetting ablation", "Rank sweep", "QLoRA",
                    "other seeds", "Adapter variants at r = 8", "Seeds and 95% intervals",
                    "Goals", "Method variants for the goals", "course's bar"):
        assert heading in report
    assert (results.parent / "phase-28-variants.png").read_bytes()[:4] == b"\x89PNG"
    assert (results.parent / "phase-28-sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(results.read_text()) == data
    assert Path(out / "sweep" / "sweep.png").is_file()


def _without_timing(value):
    """``value`` with wall times, memory peaks and absolute paths left out."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items()
                if "wall_s" not in k and k not in ("workers", "command", "base",
                                                   "load_average_at_end")}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers(tiny_base_run, tmp_path):
    from minituner.course.experiment import run_experiment
    from minituner.training.config import FinetuneConfig

    cfg = FinetuneConfig(steps=2, batch_size=8, eval_every=1)
    summaries = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_experiment(out, cfg, base=tiny_base_run, lr_grid=[1e-3], ranks=[0, 2],
                       qlora_epochs=0.02, repeat_seeds=(1,), ablation_seeds=(0,),
                       method_seeds=(0,), methods={"dropout-0": {"dropout": 0.0}},
                       framecv_seeds=(0,), folds=(4,), workers=workers)
        summaries.append(_without_timing(read_json(out / "summary.json")))
        fold = read_json(out / "framecv" / "fold4-seed0" / "results.json")
        assert fold["frames"]["test"] == ["past:4", "participle:4"]
        assert fold["slices_tuned"]["irregular-past"]["n"] == 96  # one frame, every line
    assert summaries[0] == summaries[1]
    assert summaries[0]["frame_cv"]["folds"]["4"]["validation_frames"] == ["past:5",
                                                                          "participle:5"]
    assert summaries[0]["frame_cv"]["worst_fold"] == "4"


def test_lr_search_skips_a_diverging_learning_rate(monkeypatch, tmp_path):
    from minituner.course import finetune
    from minituner.course.experiment import lr_search
    from minituner.training.loop import NonFiniteLossError

    diverging = {1e-2}

    def fake_run(base, out, cfg, resume, overwrite, **callbacks):
        if cfg.lr in diverging:
            raise NonFiniteLossError("training stopped: loss is nan at step 3")
        return {"best_val_loss": 1.0 + cfg.lr}

    monkeypatch.setattr(finetune, "run_finetune", fake_run)
    cfg = finetune.FinetuneConfig()
    search = lr_search("base", tmp_path, cfg, "lora", [1e-3, 3e-3, 1e-2])
    assert search["chosen_lr"] == 1e-3
    bad = search["runs"]["1e-02"]
    assert bad["best_val_loss"] is None and "loss is nan" in bad["note"]
    diverging.update({1e-3, 3e-3})
    with pytest.raises(ValueError, match="diverged at every learning rate"):
        lr_search("base", tmp_path, cfg, "full", [1e-3, 3e-3, 1e-2])
