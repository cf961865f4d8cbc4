"""``minituner experiment`` and ``minituner demo``: bad seed, worker and QLoRA flags fail in one
line before any run; the canonical command records the new flags."""

from __future__ import annotations

import argparse

import pytest

from minituner.cli import main


@pytest.mark.parametrize("extra, message", [
    (["--qlora-replay", "1.5"], "--qlora-replay must be a fraction"),
    (["--method-seeds", ""], "--method-seeds cannot be empty"),
    (["--ablation-seeds", "a"], "--ablation-seeds must be comma-separated integers"),
    (["--framecv-seeds", "1,1"], "--framecv-seeds must be distinct"),
])
def test_bad_experiment_flags_fail_in_one_line(extra, message, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (out / "base").exists()


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["experiment", "--out", "x", "--workers", "0"])
    assert info.value.code == 2 and "--workers" in capsys.readouterr().err


def test_canonical_command_records_full_and_workers():
    from minituner.cli.experiment import canonical_command, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["experiment", "--out", "runs/x", "--full", "--workers", "2"])
    command = canonical_command(args)
    assert "--full" in command and "--workers 2" in command
    assert "--qlora-batch-size 16 --qlora-replay 0.75" in command
    assert "--repeat-seeds 1,2,3,4" in command and "--ablation-seeds" not in command


def test_demo_harder_slices_line():
    from minituner.cli.demo import harder_slices

    results = {f"{k}_accuracy_{w}": 0.5 for k in ("form_choice", "new_shape_irregular",
                                                   "new_shape_regular", "spanish_irregular")
               for w in ("base", "tuned")}
    results["form_choice_accuracy_tuned"] = 0.75
    line = harder_slices(results)
    assert line.startswith("form choice 0.500 -> 0.750; new-shape irregular 0.500 -> 0.500")
