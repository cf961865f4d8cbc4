"""``eval`` and ``generate`` with ``--adapter NAME=DIR`` more than once: every named adapter on
one base gives what the same adapter gives alone, and a plain ``--adapter DIR`` still works."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import randomize_lora_b

from minituner.cli import main
from minituner.hf import apply_hf_lora, load_hf_model
from minituner.hf.load import base_record
from minituner.lora import lora_layers, wrap_minigpt_with_lora
from minituner.lora.adapters import save_adapter
from minituner.training.runs import load_base_run


@pytest.fixture(scope="module")
def minigpt_adapters(tiny_base_run, tmp_path_factory):
    """Two adapters (ranks 2 and 4) with nonzero B on the tiny base run."""
    root = tmp_path_factory.mktemp("mg-adapters")
    for name, r, seed in (("a", 2, 1), ("b", 4, 2)):
        model, _, _ = load_base_run(tiny_base_run)
        wrap_minigpt_with_lora(model, r=r, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
        save_adapter(model, root / name)
    return {"a": root / "a", "b": root / "b"}


def output(argv: list, capsys) -> str:
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out


def test_minigpt_generate_with_each_adapter_in_one_batch(tiny_base_run, minigpt_adapters,
                                                         capsys):
    common = ["generate", "--model", str(tiny_base_run), "--max-new-tokens", "8",
              "--num-samples", "2"]
    together = output([*common, "--adapter", f"a={minigpt_adapters['a']}",
                       "--adapter", f"b={minigpt_adapters['b']}"], capsys).splitlines()
    assert [line.split("] ")[0] for line in together] == ["[a", "[a", "[b", "[b"]
    for name in ("a", "b"):
        alone = output([*common, "--adapter", str(minigpt_adapters[name])], capsys).splitlines()
        assert [f"[{name}] {line}" for line in alone] == [t for t in together
                                                          if t.startswith(f"[{name}]")]
    assert together[0].split("] ")[1] != together[2].split("] ")[1]  # the adapters differ


def test_minigpt_eval_has_one_row_per_adapter(tiny_base_run, minigpt_adapters, capsys):
    common = ["eval", "--model", str(tiny_base_run)]
    named = [f"--adapter={name}={path}" for name, path in minigpt_adapters.items()]
    result = json.loads(output([*common, *named, "--json"], capsys))["adapters"]
    assert list(result) == ["a", "b"]
    for name, path in minigpt_adapters.items():
        alone = json.loads(output([*common, "--adapter", str(path), "--json"], capsys))
        assert result[name]["slices"] == alone["slices"]
        assert result[name]["control_ppl"] == pytest.approx(alone["control_ppl"], rel=1e-6)
    assert result["a"]["control_ppl"] != result["b"]["control_ppl"]
    table = output([*common, *named], capsys).splitlines()
    assert table[0].split()[0] == "adapter" and table[0].split()[-1] == "control_ppl"
    assert [row.split()[0] for row in table[1:]] == ["a", "b"]


def test_hf_generate_with_two_named_adapters(toy_hf_model, tmp_path, capsys):
    model_dir = toy_hf_model("gpt2")
    paths = {}
    for name, seed in (("x", 1), ("y", 2)):
        model = apply_hf_lora(load_hf_model(model_dir), r=2, alpha=4.0, seed=seed)
        randomize_lora_b(model, seed=seed, scale=0.5)
        paths[name] = save_adapter(model, tmp_path / name,
                                   extra=base_record(model_dir, "lora", torch.float32))
    common = ["generate", "--model", f"hf:{model_dir}", "--prompt", "the cat",
              "--max-new-tokens", "4", "--device", "cpu"]
    together = output([*common, "--adapter", f"x={paths['x']}", "--adapter", f"y={paths['y']}"],
                      capsys).splitlines()
    for name, line in zip(("x", "y"), together, strict=True):
        alone = output([*common, "--adapter", str(paths[name])], capsys).splitlines()
        assert line == f"[{name}] {alone[0]}"
