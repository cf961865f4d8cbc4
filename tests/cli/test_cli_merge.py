"""``minituner merge``: a Mini-GPT run folder plus adapter, and a transformers base (hf:DIR)."""

from __future__ import annotations

import torch
from hf_helpers import randomize_lora_b

from minituner.cli import main
from minituner.hf.load import base_record, load_quantized_hf_model
from minituner.lora import apply_lora, lora_layers, wrap_minigpt_with_lora
from minituner.lora.adapters import save_adapter
from minituner.training.runs import load_model


def test_minigpt_merge_writes_a_model_run(tmp_path, tiny_base_run, capsys):
    model, _, _ = load_model(tiny_base_run)
    model = wrap_minigpt_with_lora(model, r=4, seed=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    save_adapter(model, tmp_path / "adapter")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    expected = model.eval()(tokens)
    assert main(["merge", "--model", str(tiny_base_run), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "merged 12 layers (float)" in capsys.readouterr().out
    merged, _, config = load_model(tmp_path / "merged")
    assert config["kind"] == "merged" and not lora_layers(merged)
    assert (merged.eval()(tokens) - expected).abs().max() < 1e-5
    code = main(["merge", "--model", str(tiny_base_run), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "again"), "--target", "requantized"])
    assert code == 1 and "needs a QLoRA adapter" in capsys.readouterr().err


def test_hf_merge_from_the_command_line(tmp_path, toy_hf_model, capsys):
    directory = toy_hf_model("llama")
    model = apply_lora(load_quantized_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter", extra=base_record(directory, "qlora",
                                                                 torch.float32))
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--target", "requantized"]) == 0
    out = capsys.readouterr().out
    assert "merged 14 layers (requantized)" in out and "after reloading" in out
    assert (tmp_path / "merged" / "merge_report.json").is_file()
    code = main(["merge", "--out", str(tmp_path / "x")])
    assert code == 1 and "merge needs --model" in capsys.readouterr().err
