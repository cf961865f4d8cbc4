"""The CLI with adapters it cannot fully check or trust: one-line warnings and errors,
--no-verify-base, and base paths that move with the adapter."""

from __future__ import annotations

import json
import shutil

import pytest
from hf_helpers import randomize_lora_b, write_data

from minituner.cli import main
from minituner.hf import apply_hf_lora, load_hf_model
from minituner.hf.load import base_record
from minituner.lora.adapters import save_adapter

pytest.importorskip("transformers")


def hf_adapter(model_dir, out, dtype=None):
    """A float LoRA adapter saved on the toy model (recording its base like a run does)."""
    import torch

    dtype = dtype or torch.float32
    model = apply_hf_lora(load_hf_model(model_dir, dtype=dtype), r=2, alpha=4.0)
    randomize_lora_b(model)
    save_adapter(model, out, extra=base_record(model_dir, "lora", dtype))
    return out


def edit_config(directory, edit) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def minituner_lines(capsys) -> list:
    """minituner's own stderr lines (third-party import noise aside), after checking that no
    traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("minituner")]


def generate(model_dir, adapter, *extra) -> int:
    return main(["generate", "--model", f"hf:{model_dir}", "--adapter", str(adapter),
                 "--prompt", "the cat", "--max-new-tokens", "2", "--device", "cpu", *extra])


def test_peft_adapter_without_fingerprint_warns_in_one_line(tmp_path, toy_hf_model, capsys):
    model_dir = toy_hf_model("gpt2")
    adapter = hf_adapter(model_dir, tmp_path / "adapter")
    edit_config(adapter, lambda config: config.pop("minituner"))
    assert generate(model_dir, adapter) == 0
    err = minituner_lines(capsys)
    assert len(err) == 1 and err[0].startswith("minituner: warning: ")
    assert "base could not be checked" in err[0]


@pytest.mark.parametrize("key", ["r", "lora_alpha", "peft_type"])
def test_missing_required_key_is_one_line_error(tmp_path, toy_hf_model, capsys, key):
    model_dir = toy_hf_model("gpt2")
    adapter = hf_adapter(model_dir, tmp_path / "adapter")
    edit_config(adapter, lambda config: config.pop(key))
    code = generate(model_dir, adapter)
    err = minituner_lines(capsys)
    assert code == 1 and len(err) == 1
    assert f"required key '{key}' is missing" in err[0]


def test_adapter_from_fp32_base_runs_on_a_bf16_copy(tmp_path, toy_hf_model, capsys):
    import torch

    from minituner.hf.toy import write_toy_model

    model_dir = toy_hf_model("gpt2")
    adapter = hf_adapter(model_dir, tmp_path / "adapter")
    bf16_copy = write_toy_model(tmp_path / "bf16", arch="gpt2", seed=0, dtype=torch.bfloat16)
    other = toy_hf_model("gpt2", seed=1)
    assert generate(bf16_copy, adapter) == 0
    assert minituner_lines(capsys) == []
    code = generate(other, adapter)
    err = minituner_lines(capsys)
    assert code == 1 and len(err) == 1 and "fingerprint mismatch" in err[0]
    assert "--no-verify-base" in err[0]


def test_no_verify_base_attaches_with_one_warning(tmp_path, toy_hf_model, capsys):
    adapter = hf_adapter(toy_hf_model("gpt2"), tmp_path / "adapter")
    other = toy_hf_model("gpt2", seed=1)
    assert generate(other, adapter, "--no-verify-base") == 0
    err = minituner_lines(capsys)
    assert len(err) == 1 and err[0].startswith("minituner: warning: ")
    assert "fingerprint mismatch" in err[0]


def test_merge_no_verify_base(tmp_path, toy_hf_model, capsys):
    adapter = hf_adapter(toy_hf_model("gpt2"), tmp_path / "adapter")
    other = toy_hf_model("gpt2", seed=1)
    argv = ["merge", "--model", f"hf:{other}", "--adapter", str(adapter), "--out",
            str(tmp_path / "merged"), "--device", "cpu"]
    assert main(argv) == 1
    assert "--no-verify-base" in minituner_lines(capsys)[0]
    assert not (tmp_path / "merged").exists()
    assert main([*argv, "--no-verify-base"]) == 0
    err = minituner_lines(capsys)
    assert len(err) == 1 and "fingerprint mismatch" in err[0]
    assert (tmp_path / "merged" / "merge_report.json").is_file()


def test_adapter_and_base_moved_together_keep_working(tmp_path, toy_hf_model, capsys):
    project = tmp_path / "project"
    shutil.copytree(toy_hf_model("gpt2"), project / "model")
    adapter = hf_adapter(project / "model", project / "adapters" / "a1")
    base = json.loads((adapter / "adapter_config.json").read_text())["minituner"]["base"]
    assert base["relative_path"] == "../../model"
    edit_config(adapter, lambda c: c["minituner"]["base"].pop("relative_path"))
    hash_only = project / "adapters" / "old"
    shutil.copytree(adapter, hash_only)
    hf_adapter(project / "model", adapter)  # rewrite with the relative path
    moved = tmp_path / "moved"
    project.rename(moved)
    assert main(["merge", "--adapter", str(moved / "adapters" / "a1"), "--out",
                 str(tmp_path / "merged"), "--device", "cpu"]) == 0
    assert [line for line in minituner_lines(capsys) if "warning" in line] == []
    assert (tmp_path / "merged" / "merge_report.json").is_file()
    code = main(["merge", "--adapter", str(moved / "adapters" / "old"), "--out",
                 str(tmp_path / "merged2"), "--device", "cpu"])
    err = minituner_lines(capsys)
    assert code == 1 and len(err) == 1 and "model directory not found" in err[0]


def test_finetune_run_and_base_moved_together(tmp_path, toy_hf_model, capsys):
    project = tmp_path / "project"
    shutil.copytree(toy_hf_model("gpt2"), project / "model")
    data = write_data(project / "data.jsonl")
    assert main(["finetune", "--model", f"hf:{project / 'model'}", "--data", str(data),
                 "--out", str(project / "run"), "--steps", "2", "--batch-size", "4",
                 "--eval-every", "2", "--checkpoint-every", "2", "--rank", "2",
                 "--device", "cpu"]) == 0
    project.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "moved" / "run"), "--prompt", "the cat",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert minituner_lines(capsys) == []
