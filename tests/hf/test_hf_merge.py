"""Merging adapters into transformers bases: float and NF4 bases, both targets, reload checks."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf import load_hf_model
from minituner.hf.load import base_record, load_quantized_hf_model
from minituner.hf.merge import merge_hf_adapter
from minituner.lora import apply_lora
from minituner.lora.adapters import save_adapter
from minituner.quant.qlora import quantization_summary

transformers = pytest.importorskip("transformers")


def trained_adapter(directory, out, method: str = "lora", targets="all-linear"):
    """An adapter with nonzero B saved with its base record; returns its unmerged logits."""
    base = (load_quantized_hf_model(directory) if method == "qlora"
            else load_hf_model(directory))
    model = apply_lora(base, targets, r=4, alpha=8, seed=0)
    randomize_lora_b(model)
    save_adapter(model, out, extra=base_record(directory, method, torch.float32))
    return logits_of(model, token_batch())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dequantized_merge_writes_a_plain_transformers_directory(arch, method, tmp_path,
                                                                 toy_hf_model):
    directory = toy_hf_model(arch)
    expected = trained_adapter(directory, tmp_path / "adapter", method)
    report = merge_hf_adapter(f"hf:{directory}", tmp_path / "adapter", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    if arch == "gpt2":
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert (logits_of(merged, token_batch()) - expected).abs().max() < 1e-4
    assert report["reloaded_from_directory"]["max_abs_diff"] < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["target"] == "dequantized" and saved["base"]["method"] == method


def test_requantized_merge_is_nf4_and_reports_the_drift(tmp_path, toy_hf_model):
    directory = toy_hf_model("gpt2")
    expected = trained_adapter(directory, tmp_path / "adapter", "qlora")
    report = merge_hf_adapter(None, tmp_path / "adapter", tmp_path / "nf4",
                              target="requantized")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    drift = report["reloaded_from_directory"]["max_abs_diff"]
    assert 0 < drift and report["merged_in_memory"]["max_abs_diff"] == pytest.approx(drift)
    back = load_quantized_hf_model(tmp_path / "nf4")
    assert quantization_summary(back)["prequantized"]
    moved = float((logits_of(back, token_batch()) - expected).abs().max())
    assert 0 < moved < 1.0  # re-rounding every weight to NF4 moves logits, but not far


def test_merge_refuses_another_base_and_a_full_folder(tmp_path, toy_hf_model):
    trained_adapter(toy_hf_model("gpt2"), tmp_path / "adapter")
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        merge_hf_adapter(f"hf:{toy_hf_model('gpt2', seed=1)}", tmp_path / "adapter",
                         tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_hf_adapter(None, tmp_path / "adapter", tmp_path / "busy")
    with pytest.raises(ValueError, match="--target"):
        merge_hf_adapter(None, tmp_path / "adapter", tmp_path / "m2", target="float16")


def test_atomic_directory_replaces_or_leaves_the_old_folder(tmp_path):
    from minituner.util.files import atomic_directory

    out = tmp_path / "model"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "new").write_text("new")
        raise RuntimeError("write failed")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # staging removed
    assert [p.name for p in out.iterdir()] == ["old"]
    with atomic_directory(out) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out.iterdir()] == ["new"] and out.stat().st_mode & 0o777 == \
        0o777 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
