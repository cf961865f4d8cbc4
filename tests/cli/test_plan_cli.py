"""finetune --plan prints the preflight plan without training; --packing trains packed rows and
results.json holds predicted and measured peak memory side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hf_helpers import write_data

from minituner.cli import main
from minituner.hf.plan import usable_cores


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("plan") / "data.jsonl", n=40)


def test_plan_prints_steps_padding_memory_and_makes_no_run_folder(toy_hf_model, data, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    threads = usable_cores() + 1
    assert main(["finetune", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                 "--batch-size", "2", "--epochs", "1", "--plan", "--out", str(out),
                 "--threads", str(threads)]) == 0
    printed = capsys.readouterr()
    assert not out.exists()
    assert "steps 20," in printed.out  # 40 examples / batch 2, one epoch
    assert "unpacked (this run): 40 rows, padding fraction" in printed.out
    assert "packed: " in printed.out and "predicted peak memory" in printed.out
    for bucket in ("weights", "gradients", "optimizer", "activations"):
        assert bucket in printed.out
    assert f"--threads {threads} exceeds" in printed.err


def test_plan_refuses_mini_gpt_models(tiny_base_run, capsys):
    assert main(["finetune", "--base", str(tiny_base_run), "--plan"]) != 0
    assert "--plan applies to transformers (hf:) models only" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_run_records_padding_and_memory(toy_hf_model, data, tmp_path, capsys, arch):
    model = f"hf:{toy_hf_model(arch)}"
    common = ["finetune", "--model", model, "--data", str(data), "--batch-size", "1",
              "--max-len", "32", "--packing"]
    assert main([*common, "--steps", "1", "--plan"]) == 0
    planned = capsys.readouterr().out
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["packing"] is True
    assert 1 < results["train_rows"] < 40  # several examples share a row
    assert 0 <= results["padding_fraction"] < 0.5
    memory = results["memory"]
    assert memory["predicted"]["total_bytes"] == sum(memory["predicted"]["buckets"].values())
    assert memory["measured"]["peak_rss_growth_bytes"] > 0
    assert memory["cpu_mmap_threshold_bytes"] is None  # glibc's own here (tests/conftest.py)
    assert f"{memory['predicted']['total_bytes'] / 1e6:,.1f} MB" in planned
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["finetune"]["packing"] is True


def test_packing_is_refused_for_mini_gpt(tiny_base_run, tmp_path, capsys):
    assert main(["finetune", "--base", str(tiny_base_run), "--packing",
                 "--out", str(tmp_path / "o")]) != 0
    assert "--packing cannot be used with Mini-GPT" in capsys.readouterr().err


def test_a_bad_mmap_threshold_is_one_line(toy_hf_model, data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MINITUNER_MMAP_THRESHOLD", "lots")
    assert main(["finetune", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                 "--steps", "1", "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].endswith("MINITUNER_MMAP_THRESHOLD must be a positive number "
                                         "of bytes or 'glibc', got 'lots'")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting,expected", [(None, 1 << 20), ("glibc", None),
                                              ("4194304", 4 << 20)])
def test_a_cpu_finetune_fixes_the_mmap_threshold(toy_hf_model, data, tmp_path, setting,
                                                 expected):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MINITUNER_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_")}
    if setting is not None:
        env["MINITUNER_MMAP_THRESHOLD"] = setting
    done = subprocess.run([sys.executable, "-m", "minituner", "finetune", "--model",
                           f"hf:{toy_hf_model('gpt2')}", "--data", str(data), "--steps", "1",
                           "--device", "cpu", "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["memory"]["cpu_mmap_threshold_bytes"] == expected
