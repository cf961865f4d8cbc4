"""--method dora / qdora from the command line: Mini-GPT and hf: runs, then eval, generate,
merge and --resume of a DoRA run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_helpers import write_data

from minituner.cli import main
from minituner.training.checkpoint import checkpoint_steps
from minituner.util.files import load_safetensors

TINY = ["--steps", "4", "--batch-size", "8", "--eval-every", "2", "--checkpoint-every", "2"]
MAGNITUDES = 8 * 64 + 2 * 256 + 2 * 64  # one per output row of Mini-GPT's 12 Linears


@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_minigpt_dora_run_eval_generate_merge(method, tiny_base_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(run), "--method", method,
                 *TINY]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["trainable_params"] == 2304 * 8 + MAGNITUDES
    assert ("qlora" in results) is (method == "qdora")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert main(["eval", "--model", str(run)]) == 0
    assert main(["generate", "--model", str(run), "--prompt", "yesterday he"]) == 0
    assert main(["merge", "--model", str(run), "--out", str(tmp_path / "merged")]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["max_abs_diff"] < 1e-5
    assert report["target"] == ("dequantized" if method == "qdora" else "float")
    capsys.readouterr()


def test_minigpt_dora_resume_gives_the_same_adapter(tiny_base_run, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    flags = ["--base", str(tiny_base_run), "--method", "dora", *TINY]
    assert main(["finetune", "--out", str(whole), *flags]) == 0
    shutil.copytree(whole, cut)
    for step, path in checkpoint_steps(cut):  # as if the run had stopped after step 2
        if step > 2:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("results.json", "adapter", "manifest.json"):
        target = cut / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    assert main(["finetune", "--out", str(cut), *flags, "--resume"]) == 0
    ours = load_safetensors(cut / "adapter" / "adapter_model.safetensors")
    reference = load_safetensors(whole / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in key for key in reference)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[key], reference[key]) for key in reference)


@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_hf_dora_run_eval_merge(method, toy_hf_model, tmp_path, capsys):
    data, run = write_data(tmp_path / "data.jsonl"), tmp_path / "run"
    model = toy_hf_model("gpt2")
    assert main(["finetune", "--model", f"hf:{model}", "--data", str(data), "--out", str(run),
                 "--method", method, "--steps", "2"]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["minituner"]["base"]["method"] == ("qlora" if method == "qdora" else "lora")
    assert main(["eval", "--model", str(run)]) == 0
    assert main(["merge", "--model", str(run), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()


def test_dora_refuses_a_quant_scheme(tiny_base_run, tmp_path, capsys):
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(tmp_path / "o"),
                 "--method", "dora", "--quant-scheme", "nf4_per_group_64"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--quant-scheme cannot be used with --method dora" in err and "qdora" in err
    assert "\n" not in err
