"""--init pissa|loftq[:N] and --loraplus-lr-ratio end to end: run folders, converted adapters that
eval/generate read on the original base, and PEFT loading them (tiny models: plumbing)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, token_batch, write_data

from minituner.cli import main
from minituner.hf import apply_hf_lora, load_hf_model
from minituner.lora import lora_layers, lora_state_dict
from minituner.lora.adapters import base_fingerprint, base_tensor_stats, load_adapter, save_adapter
from minituner.util.files import read_json

TINY = ["--steps", "3", "--batch-size", "8", "--eval-every", "3", "--checkpoint-every", "3"]


def test_minigpt_pissa_with_loraplus_run(tiny_base_run, tmp_path, capsys):
    out = tmp_path / "pissa"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--rank", "4",
                 "--init", "pissa", "--loraplus-lr-ratio", "16", *TINY]) == 0
    settings = read_json(out / "config.json")["finetune"]
    assert settings["init"] == "pissa" and settings["loraplus_lr_ratio"] == 16
    adapter = read_json(out / "adapter" / "adapter_config.json")
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 32
    assert adapter["minituner"]["converted"]["from_init"] == "pissa"
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--json"]) == 0  # on the original base
    assert json.loads(capsys.readouterr().out)["control_ppl"] > 1
    # resume keeps the settings: a finished run answers from its results
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--rank", "4",
                 "--init", "pissa", "--loraplus-lr-ratio", "16", "--resume", *TINY]) == 0
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--rank", "4",
                 "--init", "pissa", "--resume", *TINY]) != 0
    assert "loraplus_lr_ratio" in capsys.readouterr().err


def test_minigpt_loftq_run(tiny_base_run, tmp_path, capsys):
    out = tmp_path / "loftq"
    assert main(["finetune", "--base", str(tiny_base_run), "--out", str(out), "--rank", "4",
                 "--method", "qlora", "--init", "loftq:2", *TINY]) == 0
    results = read_json(out / "results.json")
    assert 0 < results["qlora"]["logit_difference"]["relative"] < 1
    adapter = read_json(out / "adapter" / "adapter_config.json")
    assert adapter["r"] == 8 and adapter["minituner"]["converted"]["from_init"] == "loftq"
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--json"]) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_pissa_adapter_reproduces_the_trained_model_in_minituner_and_peft(
        arch, tmp_path, toy_hf_model):
    peft = pytest.importorskip("peft")
    directory, ids = toy_hf_model(arch), token_batch()
    original = load_hf_model(directory)
    fingerprint, stats = base_fingerprint(original), base_tensor_stats(original)
    model = apply_hf_lora(load_hf_model(directory), "all-linear", r=4, alpha=8, init="pissa",
                          seed=0)
    assert (logits_of(model, ids) - logits_of(original, ids)).abs().max() < 1e-4
    initial = lora_state_dict(model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as after training: both factors moved
        for _, layer in lora_layers(model):
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=generator) * 0.05)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory),
                 initial=initial, fingerprint=fingerprint, tensor_stats=stats)
    ours = load_adapter(load_hf_model(directory), tmp_path / "adapter")
    assert (logits_of(ours, ids) - expected).abs().max() < 1e-5
    theirs = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "adapter")
    assert (logits_of(theirs, ids) - expected).abs().max() < 1e-5


def test_hf_pissa_run_from_the_cli(tmp_path, toy_hf_model):
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert main(["finetune", "--model", f"hf:{toy_hf_model('gpt2')}", "--data", str(data),
                 "--out", str(out), "--steps", "2", "--rank", "4", "--init", "pissa",
                 "--loraplus-lr-ratio", "4"]) == 0
    adapter = read_json(out / "adapter" / "adapter_config.json")
    assert adapter["r"] == 8 and adapter["fan_in_fan_out"] is True
    assert main(["eval", "--model", str(out), "--json"]) == 0
