"""The adapter-variant table: each variant's config and layers, the mean/std aggregation, the
runs it writes (reusing identical runs) and its place in the experiment's results file."""

from __future__ import annotations

import math

import pytest
import torch

from minituner.course.finetune import build_trainable
from minituner.course.variants import (
    LOFTQ_INIT,
    VARIANTS,
    mean_std,
    run_variants,
    summarise,
    variant_config,
)
from minituner.lora import lora_layers
from minituner.lora.dora import DoRALinear
from minituner.quant.qlora import QuantizedLinear
from minituner.training.config import FinetuneConfig
from minituner.training.loop import build_optimizer
from minituner.training.runs import load_base_run
from minituner.util.files import read_json

CHOSEN = FinetuneConfig(method="lora", rank=8, lr=1e-2, steps=1, batch_size=8, eval_every=1)


def _layers(base_dir, name: str):
    model, _, _ = load_base_run(base_dir)
    original = {n: layer.weight.detach().clone() for n, layer in model.named_modules()
                if isinstance(layer, torch.nn.Linear) and n != "lm_head"}
    wrapped, _ = build_trainable(model, variant_config(CHOSEN, name, seed=0))
    return wrapped, dict(lora_layers(wrapped)), original


def test_variant_configs_change_only_their_settings():
    for name, changes in VARIANTS.items():
        cfg = variant_config(CHOSEN, name, seed=2)
        assert cfg.seed == 2 and cfg.rank == 8 and cfg.lr == CHOSEN.lr
        assert cfg.replay == CHOSEN.replay and cfg.kl == CHOSEN.kl and cfg.steps == CHOSEN.steps
        changed = {k for k, v in cfg.to_dict().items() if v != CHOSEN.to_dict()[k]} - {"seed"}
        assert changed == set(changes), name
        cfg.validate()
    assert variant_config(CHOSEN, "loftq", 0).init == LOFTQ_INIT == "loftq:5"
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_config(CHOSEN, "vera", 0)


def test_dora_variant_has_a_magnitude_per_row(tiny_base_run):
    _, layers, _ = _layers(tiny_base_run, "dora")
    assert layers and all(isinstance(layer, DoRALinear) for layer in layers.values())
    for layer in layers.values():
        magnitude = layer.lora_magnitude_vector
        assert magnitude.requires_grad and magnitude.shape == (layer.lora_B.shape[0],)


def test_pissa_variant_replaces_the_base_by_the_residual(tiny_base_run):
    _, layers, original = _layers(tiny_base_run, "pissa")
    for name, layer in layers.items():
        weight = layer.base.weight.detach()
        assert not torch.allclose(weight, original[name], atol=1e-4), name
        delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        assert torch.allclose(weight + delta, original[name], atol=1e-5), name


def test_loraplus_variant_gives_b_sixteen_times_the_lr(tiny_base_run):
    model, layers, _ = _layers(tiny_base_run, "loraplus")
    cfg = variant_config(CHOSEN, "loraplus", 0)
    optimizer = build_optimizer(model, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio)
    b_params = {id(layer.lora_B) for layer in layers.values()}
    a_params = {id(layer.lora_A) for layer in layers.values()}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & b_params:
            assert ids == b_params and group["lr"] == pytest.approx(16 * cfg.lr)
        else:
            assert group["lr"] == cfg.lr and a_params & ids <= a_params
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2 * len(layers)


@pytest.mark.parametrize("name", ["qlora", "loftq"])
def test_nf4_variants_quantize_the_base(tiny_base_run, name):
    _, layers, original = _layers(tiny_base_run, name)
    for key, layer in layers.items():
        assert isinstance(layer.base, QuantizedLinear), key
        b_nonzero = bool(layer.lora_B.detach().abs().sum() > 0)
        assert b_nonzero == (name == "loftq"), key  # LoftQ starts B from the SVD of W - Q
        if name == "loftq":  # quantized base + adapter is closer to W than NF4 alone
            w = original[key]
            deq = layer.base.dequantized_weight(torch.float32)
            start = deq + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
            assert (w - start).norm() < (w - deq).norm(), key


def test_mean_std_is_the_sample_standard_deviation():
    mean, std = mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)
    assert mean_std([2.0]) == (2.0, None)
    assert mean_std([1.5, 1.5]) == (1.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def _fake(irregular: float, change: float, params: int = 18432) -> dict:
    return {"irregular_accuracy_tuned": irregular, "regular_accuracy_tuned": 0.95,
            "control_ppl_tuned": 1.6 * (1 + change), "control_ppl_change": change,
            "irregular_accuracy_base": 0.14, "regular_accuracy_base": 0.975,
            "control_ppl_base": 1.6, "trainable_params": params}


def test_summarise_aggregates_over_seeds_and_compares_with_lora():
    rows = {
        "lora": {0: ("a", _fake(0.80, 0.02)), 1: ("b", _fake(0.82, 0.03)),
                 2: ("c", _fake(0.84, 0.04))},
        "dora": {0: ("d", _fake(0.90, 0.021, 19584)), 1: ("e", _fake(0.91, 0.031, 19584)),
                 2: ("f", _fake(0.92, 0.041, 19584))},
    }
    summary = summarise(rows, CHOSEN)
    lora, dora = summary["variants"]["lora"], summary["variants"]["dora"]
    assert lora["seeds"] == [0, 1, 2] and lora["runs"] == ["a", "b", "c"]
    assert lora["irregular_accuracy"]["mean"] == pytest.approx(0.82)
    assert lora["irregular_accuracy"]["std"] == pytest.approx(0.02)
    assert lora["control_ppl_change"]["values"] == [0.02, 0.03, 0.04]
    assert dora["trainable_params"] == 19584 and dora["label"] == "DoRA"
    assert summary["base"] == {"irregular_accuracy": 0.14, "regular_accuracy": 0.975,
                               "control_ppl": 1.6}
    vs = summary["vs_lora"]["dora"]
    assert vs["irregular_accuracy"]["delta"] == pytest.approx(0.09)
    assert vs["irregular_accuracy"]["beyond_seed_spread"] is True  # 0.09 > 0.01 + 0.02
    assert vs["control_ppl_change"]["beyond_seed_spread"] is False  # 0.001 < 0.01 + 0.01
    assert vs["regular_accuracy"]["beyond_seed_spread"] is False
    assert "seed" not in summary["config"] and math.isclose(summary["config"]["lr"], 1e-2)


@pytest.mark.slow
def test_run_variants_writes_the_table_and_reuses_identical_runs(tiny_base_run, tmp_path):
    from minituner.course.finetune import run_finetune

    lora_run = tmp_path / "lora-r8"
    run_finetune(tiny_base_run, lora_run, variant_config(CHOSEN, "lora", 0))
    stale = tmp_path / "stale"  # a different config is not reused
    run_finetune(tiny_base_run, stale, variant_config(CHOSEN, "lora", 0).replace(lr=3e-3))
    seen = []
    summary = run_variants(tiny_base_run, tmp_path / "variants", CHOSEN, seeds=(0,),
                           names=["lora", "loftq"], reuse={("lora", 0): lora_run},
                           on_run=lambda name, results: seen.append(name))
    assert seen == ["variants/loftq/seed0"]
    assert summary["variants"]["lora"]["runs"] == ["../lora-r8"]
    assert summary["variants"]["lora"]["irregular_accuracy"]["std"] is None
    assert read_json(tmp_path / "variants" / "variants.json") == summary
    assert (tmp_path / "variants" / "variants.png").read_bytes()[:4] == b"\x89PNG"
    loftq = read_json(tmp_path / "variants" / "loftq" / "seed0" / "config.json")["finetune"]
    assert loftq["init"] == "loftq:5" and loftq["method"] == "qlora"
    again = run_variants(tiny_base_run, tmp_path / "again", CHOSEN, seeds=(0,), names=["lora"],
                         reuse={("lora", 0): stale})
    assert again["variants"]["lora"]["runs"] == ["lora/seed0"]


@pytest.mark.parametrize("extra, message", [
    ([], "--only variants needs --base"),
    (["--base", "BASE", "--lr-grid", "1e-3"], "--lr-grid cannot be used with --only variants"),
    (["--base", "BASE", "--results-json", "r.json"], "--results-json cannot be used with --only"),
    (["--base", "BASE", "--variant-seeds", ""], "--variant-seeds cannot be empty"),
    (["--base", "BASE", "--variant-seeds", "0,0"], "--variant-seeds must be distinct"),
])
def test_only_variants_refuses_what_it_would_ignore(tiny_base_run, tmp_path, capsys, extra,
                                                    message):
    from minituner.cli import main

    argv = ["experiment", "--only", "variants", "--out", str(tmp_path / "v"),
            *[str(tiny_base_run) if a == "BASE" else a for a in extra]]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_only_variants_from_the_cli_writes_a_report(tiny_base_run, tmp_path, capsys):
    from minituner.cli import main

    out = tmp_path / "v"
    assert main(["experiment", "--only", "variants", "--base", str(tiny_base_run), "--out",
                 str(out), "--steps", "1", "--batch-size", "8", "--eval-every", "1",
                 "--variant-seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert "loftq" in printed and "+-" in printed
    table = read_json(out / "variants.json")
    assert table["variants"]["pissa"]["seeds"] == [0, 1]
    assert table["variants"]["pissa"]["irregular_accuracy"]["std"] is not None
    report = (out / "REPORT.md").read_text()
    assert "Adapter variants at r = 8" in report and "QLoRA + LoftQ (5 iters)" in report
