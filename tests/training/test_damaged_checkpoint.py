"""A damaged newest checkpoint: --resume falls back to the previous complete one and says so;
a checkpoint with non-finite values stays an error; later checkpoints go when one is saved."""

from __future__ import annotations

import pytest
import torch

from minituner.training.checkpoint import (
    RunWriter,
    UnreadableCheckpoint,
    checkpoint_steps,
    load_latest_checkpoint,
)


def state(step: int, value: float = 1.0) -> dict:
    return {"step": step, "trainable": {"w": torch.full((2,), value)}}


def test_resume_falls_back_from_a_truncated_newest_checkpoint_to_the_same_bytes(tiny_base_run,
                                                                                tmp_path, capsys):
    from minituner.cli import main

    out = tmp_path / "run"
    flags = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "6",
             "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(flags) == 0
    adapter = out / "adapter" / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    (out / "results.json").unlink()  # killed while writing its step-6 checkpoint
    newest = out / "checkpoints" / "step-000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert main(flags) == 1  # without --resume: refused, counting the steps a resume keeps
    assert "4 steps done; pass --resume" in capsys.readouterr().err
    assert main([*flags, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 4 of 6" in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "step-000006.pt is damaged" in warning[0]
    assert "resuming from the previous one, step 4" in warning[0]
    assert "Traceback" not in captured.err
    assert adapter.read_bytes() == whole
    assert [s for s, _ in checkpoint_steps(out)] == [4, 6]


def test_no_readable_checkpoint_is_a_one_line_error(tiny_base_run, tmp_path, capsys):
    from minituner.cli import main

    out = tmp_path / "run"
    flags = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "4",
             "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(flags) == 0
    (out / "results.json").unlink()
    for _, path in checkpoint_steps(out):
        path.write_bytes(b"garbage")
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no readable checkpoint (step-000004.pt, step-000002.pt damaged)" in err


def test_a_non_finite_newest_checkpoint_is_refused_not_skipped(tmp_path):
    writer = RunWriter(tmp_path)
    writer.save_checkpoint(state(2))
    writer.save_checkpoint(state(4, float("nan")))
    with pytest.raises(ValueError, match="non-finite") as caught:
        load_latest_checkpoint(tmp_path)
    assert not isinstance(caught.value, UnreadableCheckpoint)


def test_load_latest_skips_garbage_and_empty_files_and_names_them(tmp_path):
    writer = RunWriter(tmp_path, keep=3)
    for step in (2, 4, 6):
        writer.save_checkpoint(state(step, float(step)))
    folder = tmp_path / "checkpoints"
    (folder / "step-000006.pt").write_bytes(b"")
    (folder / "step-000004.pt").write_bytes(b"not a checkpoint at all")
    loaded, skipped = load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 2 and float(loaded["trainable"]["w"][0]) == 2.0
    assert [p.name for p in skipped] == ["step-000006.pt", "step-000004.pt"]
    assert load_latest_checkpoint(tmp_path / "none") == (None, [])


def test_saving_a_step_drops_later_checkpoints_and_keeps_the_newest(tmp_path):
    writer = RunWriter(tmp_path, keep=2)
    for step in (2, 4, 6):
        writer.save_checkpoint(state(step))
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [4, 6]
    writer.save_checkpoint(state(5))  # resumed from 4 after a damaged step-6
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [4, 5]


def test_tmp_files_left_by_a_kill_are_removed_when_the_run_is_resumed(tiny_base_run, tmp_path,
                                                                     capsys):
    from minituner.cli import main

    out = tmp_path / "run"
    flags = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "4",
             "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(flags) == 0
    (out / "results.json").unlink()
    (out / "checkpoints" / "step-000004.pt").unlink()
    left = [out / "checkpoints" / ".step-000004.pt.k3j_9xqa.tmp", out / ".config.json.ab12cd34.tmp",
            out / "adapter" / ".adapter_model.safetensors.zz00yy11.tmp"]
    left[0].write_bytes(b"half a checkpoint")
    for path in left[1:]:
        path.write_bytes(b"")
    mine = out / ".notes.tmp"  # not an atomic_write temp file: kept
    mine.write_text("keep me")
    assert main([*flags, "--resume"]) == 0
    assert not any(path.exists() for path in left)
    assert mine.read_text() == "keep me"


def test_remove_stale_tmp_on_reuse_of_the_folder(tmp_path):
    from minituner.training.runs import prepare_run_dir, remove_stale_tmp, write_config

    config = {"kind": "pretrain", "format": 1, "seed": 0}
    out = prepare_run_dir(tmp_path / "run", config)
    write_config(out, config)
    stale = out / ".model.safetensors.a1b2c3d4.tmp"
    stale.write_bytes(b"")
    prepare_run_dir(out, config)  # the same run again
    assert not stale.exists()
    assert remove_stale_tmp(out) == []
