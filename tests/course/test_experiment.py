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
                 "--qlora-epochs", "0.02", "--repeat-seeds", "1", "--variant-seeds", "0,1",
                 "--results-json", str(results)]) == 0
    for name in ("lora-r8", "full-ft", "qlora-r8", "ablation/none", "ablation/replay",
                 "ablation/kl", "sweep/r32"):
        assert (out / name / "results.json").is_file(), name
    sweep = read_json(out / "sweep" / "sweep.json")
    assert sweep["ranks"] == [0, 2, 4, 8, 16, 32]
    assert sweep["trainable_params"] == [2304 * r for r in sweep["ranks"]]
    data = load_results(root)  # the quiz's reader accepts the file
    assert data["sweep"]["ranks"] == [2, 4, 8, 16, 32] and data["sweep"]["base"]["rank"] == 0
    lora = read_json(out / "lora-r8" / "results.json")
    assert data["lora_r8"]["control_ppl_change"] == lora["control_ppl_change"]
    assert set(data["ablation"]) == {"none", "replay", "kl", "both"}
    assert data["ablation"]["kl"]["replay_nll"] == 0.0
    assert data["lora_r8_seeds"]["seeds"] == [0, 1]
    assert data["lora_r8_seeds"]["control_ppl_change"][0] == lora["control_ppl_change"]
    assert "minituner experiment" in data["command"] and data["seed"] == 0
    assert "--variant-seeds 0,1" in data["command"]
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
                    "other seeds", "Adapter variants at r = 8"):
        assert heading in report
    assert (results.parent / "phase-28-variants.png").read_bytes()[:4] == b"\x89PNG"
    assert (results.parent / "phase-28-sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(results.read_text()) == data
    assert Path(out / "sweep" / "sweep.png").is_file()


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
