"""Crash safety: a fine-tuning run SIGKILLed at a random step and resumed ends with the same
adapter as an uninterrupted run; a pretraining run killed and resumed ends with the same bytes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from minituner.training.checkpoint import checkpoint_steps
from minituner.util.files import load_safetensors, read_json

STEPS = 24


def command(base, out, *extra) -> list:
    return [sys.executable, "-m", "minituner", "finetune", "--base", str(base), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "8", "--checkpoint-every", "2",
            "--eval-every", "5", "--threads", "1", *extra]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def wait_for_checkpoint(child: subprocess.Popen, out, step: int, timeout: float) -> None:
    """Wait until ``out`` holds a checkpoint at ``step`` or later; ``child`` must still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        steps = [s for s, _ in checkpoint_steps(out)]
        if steps and steps[-1] >= step:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the run finished before it could be killed"


def kill_at_checkpoint(cmd: list, out, step: int) -> None:
    """Run ``cmd`` and SIGKILL it once ``out`` holds a checkpoint at ``step`` or later."""
    child = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(child, out, step, timeout=120)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_adapter(tiny_base_run, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    kill_after = random.Random().randrange(2, STEPS - 4, 2)  # a random checkpointed step
    kill_at_checkpoint(command(tiny_base_run, killed), killed, kill_after)
    assert not (killed / "results.json").exists()
    done = subprocess.run(command(tiny_base_run, whole), env=environment(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = subprocess.run(command(tiny_base_run, killed, "--resume"), env=environment(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {read_json(killed / 'results.json')['resumed_from_step']} of " \
        f"{STEPS}" in resumed.stdout
    results = read_json(killed / "results.json")
    assert results["resumed_from_step"] >= kill_after
    assert len((killed / "train_log.jsonl").read_text().splitlines()) == STEPS
    a = load_safetensors(whole / "adapter" / "adapter_model.safetensors")
    b = load_safetensors(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert results["best_step"] == read_json(whole / "results.json")["best_step"]


def test_resume_refuses_a_run_with_other_settings(tiny_base_run, tmp_path, capsys):
    from minituner.cli import main

    out = tmp_path / "run"
    flags = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "2",
             "--batch-size", "8"]
    assert main(flags) == 0
    capsys.readouterr()
    assert main([*flags, "--resume", "--lr", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "cannot change finetune.lr: run 0.01, now 0.05" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


PRETRAIN_STEPS = 60


def pretrain_command(out, config, *extra) -> list:
    return [sys.executable, "-m", "minituner", "pretrain", "--out", str(out), "--steps",
            str(PRETRAIN_STEPS), "--batch-size", "8", "--config", str(config), *extra]


@pytest.mark.slow
def test_pretraining_sigkilled_then_resumed_gives_the_same_bytes(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("eval_every: 4\nseed: 2\n")  # a checkpoint at every evaluation
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    kill_after = random.Random().randrange(4, PRETRAIN_STEPS - 12, 4)
    kill_at_checkpoint(pretrain_command(killed, config), killed, kill_after)
    assert not (killed / "results.json").exists()
    stopped_at = checkpoint_steps(killed)[-1][0]

    again = subprocess.run(pretrain_command(killed, config), env=environment(),
                           capture_output=True, text=True)
    assert again.returncode == 1
    assert "unfinished run" in again.stderr
    assert (f"{stopped_at} steps done; pass --resume to continue or --overwrite to start over"
            in again.stderr)
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    assert checkpoint_steps(killed)[-1][0] == stopped_at  # the refused run touched nothing

    done = subprocess.run(pretrain_command(whole, config), env=environment(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = subprocess.run(pretrain_command(killed, config, "--resume"), env=environment(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {stopped_at} of {PRETRAIN_STEPS}" in resumed.stdout
    results = read_json(killed / "results.json")
    assert results["resumed_from_step"] == stopped_at >= kill_after
    assert len((killed / "train_log.jsonl").read_text().splitlines()) == PRETRAIN_STEPS
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert results["val_loss"] == read_json(whole / "results.json")["val_loss"]
    finished = snapshot(killed)
    complete = subprocess.run(pretrain_command(killed, config, "--resume"), env=environment(),
                              capture_output=True, text=True)
    assert complete.returncode == 0 and "the run is complete (60 steps)" in complete.stdout
    assert snapshot(killed) == finished  # it did nothing else


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_finetune_refuses_a_killed_run_then_resumes_and_says_when_complete(tiny_base_run,
                                                                           tmp_path, capsys):
    from minituner.cli import main

    out = tmp_path / "run"
    flags = ["finetune", "--base", str(tiny_base_run), "--out", str(out), "--steps", "4",
             "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(flags) == 0
    whole = read_json(out / "results.json")
    (out / "results.json").unlink()  # killed after its step-4 checkpoint, before the end
    (out / "checkpoints" / "step-000004.pt").unlink()
    capsys.readouterr()
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert "2 steps done; pass --resume to continue or --overwrite to start over" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "checkpoints" / "step-000002.pt").is_file()  # the refusal touched nothing
    assert main([*flags, "--resume", "--threads", "2"]) == 0  # threads may change
    assert "resuming from step 2 of 4" in capsys.readouterr().out
    assert read_json(out / "results.json")["best_val_loss"] == whole["best_val_loss"]
    before = snapshot(out)
    assert main([*flags, "--resume"]) == 0
    assert "the run is complete (4 steps); nothing to resume" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_over_a_changed_base_needs_no_verify_base(tiny_base_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from minituner.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_base_run, base)
    out = tmp_path / "run"
    flags = ["finetune", "--base", str(base), "--out", str(out), "--steps", "4",
             "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(flags) == 0
    (out / "results.json").unlink()  # as if killed after its last checkpoint
    weights = load_file(base / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # the base changed since the run started
    save_file(weights, base / "model.safetensors")
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base" in err[0] and "--resume cannot change" in err[0]
    assert main([*flags, "--resume", "--no-verify-base"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 4 of 4" in captured.out
    assert "fingerprint differs" in captured.err


def test_a_run_moved_with_its_base_still_resumes(tiny_base_run, tmp_path, capsys):
    import shutil

    from minituner.cli import main

    shutil.copytree(tiny_base_run, tmp_path / "a" / "base")
    flags = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--eval-every", "2"]
    assert main(["finetune", "--base", str(tmp_path / "a" / "base"), "--out",
                 str(tmp_path / "a" / "run"), *flags]) == 0
    (tmp_path / "a" / "run" / "results.json").unlink()  # as if killed after its last checkpoint
    (tmp_path / "a").rename(tmp_path / "b")
    capsys.readouterr()
    assert main(["finetune", "--base", str(tmp_path / "b" / "base"), "--out",
                 str(tmp_path / "b" / "run"), *flags, "--resume"]) == 0
    assert "resuming from step 4 of 4" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "b" / "run")]) == 0
