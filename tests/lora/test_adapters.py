"""Adapter files: PEFT layout, round trips, base fingerprint, and refusing bad input untouched."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import minituner
from minituner.lora import (
    MINIGPT_TARGETS,
    apply_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    model_lora_config,
    wrap_minigpt_with_lora,
)
from minituner.lora.adapters import base_fingerprint, load_adapter, save_adapter
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.util.files import sha256_file


def base_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig())


def adapted_model(r: int = 4, seed: int = 0, **kwargs) -> MiniGPT:
    """A wrapped Mini-GPT whose B matrices are nonzero (as after training)."""
    model = wrap_minigpt_with_lora(base_model(seed), r=r, seed=1, **kwargs)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(9))


def snapshot(model) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"state": state, "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "types": [type(m) for m in model.modules()]}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


# ----------------------------------------------------------------------------- layout


def test_saved_layout_is_peft_shaped(tmp_path):
    model = adapted_model(r=4)
    save_adapter(model, tmp_path, base_model_name_or_path="mini-gpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 24
    assert tensors["base_model.model.blocks.0.attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.blocks.1.mlp.fc1.lora_B.weight"].shape == (256, 4)
    assert tensors["base_model.model.blocks.1.mlp.fc2.lora_A.weight"].shape == (4, 256)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16.0,
        "lora_dropout": 0.0, "target_modules": sorted(MINIGPT_TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": "gaussian", "modules_to_save": None,
        "base_model_name_or_path": "mini-gpt", "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None, "layers_to_transform": None,
        "layers_pattern": None,
    }
    assert {k: config[k] for k in expected} == expected
    section = config["minituner"]
    assert section["format_version"] == 1 and section["init"] == "gaussian"
    assert section["init_a_std"] == "1/sqrt(r)" and "1/r" in section["init_lora_weights_note"]
    assert section["base_config"] == MiniGPTConfig().to_dict()
    assert section["base_fingerprint"]["value"] == base_fingerprint(base_model(0))
    assert "peft_loadable" not in section


@pytest.mark.parametrize(("init", "peft_value"), [("kaiming", True), ("gaussian_std", "gaussian")])
def test_init_recorded_in_peft_terms(tmp_path, init, peft_value):
    save_adapter(adapted_model(init=init), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == peft_value and config["minituner"]["init"] == init
    assert load_adapter(base_model(), tmp_path).blocks[0].mlp.fc1.init == init


def test_all_linear_target_saved_as_names_peft_can_match(tmp_path):
    save_adapter(apply_lora(base_model(), "all-linear", r=2), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(MINIGPT_TARGETS)
    assert config["minituner"]["target_modules_requested"] == "all-linear"


def test_same_model_saves_identical_bytes(tmp_path):
    save_adapter(adapted_model(), tmp_path / "a")
    save_adapter(adapted_model(), tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)


def test_fingerprint_ignores_wrapping_and_lora_but_sees_base_changes():
    plain = base_model(0)
    print_before = base_fingerprint(plain)
    assert len(print_before) == 64 and base_fingerprint(base_model(0)) == print_before
    assert base_fingerprint(adapted_model(seed=0)) == print_before
    assert base_fingerprint(base_model(1)) != print_before
    with torch.no_grad():
        plain.ln_f.bias[0] += 1e-3
    assert base_fingerprint(plain) != print_before



def test_a_fingerprint_given_to_save_is_stored_as_is(tmp_path, monkeypatch):
    model = adapted_model()
    value = base_fingerprint(model)
    save_adapter(model, tmp_path / "computed")
    monkeypatch.setattr(minituner.lora.adapters, "base_fingerprint",
                        lambda _: pytest.fail("rehashed"))
    save_adapter(model, tmp_path / "given", fingerprint=value)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(tmp_path / "computed" / name) == sha256_file(tmp_path / "given" / name)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_into_plain_and_wrapped_models(tmp_path):
    model = adapted_model(r=4, alpha=8.0, use_rslora=True, rank_pattern={"fc1": 2},
                          alpha_pattern={"o_proj": 3.0})
    save_adapter(model, tmp_path)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    plain = base_model(0)
    assert load_adapter(plain, tmp_path) is plain
    assert plain.blocks[0].mlp.fc1.r == 2 and plain.blocks[1].attn.o_proj.alpha == 3.0
    assert plain.blocks[0].attn.q_proj.scaling == pytest.approx(8.0 / 2.0)  # rsLoRA: alpha/sqrt(4)
    saved = lora_state_dict(model)
    assert all(torch.equal(saved[k], v) for k, v in lora_state_dict(plain).items())
    assert all(p.requires_grad == ("lora_" in n) for n, p in plain.named_parameters())
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), expected)
    wrapped = wrap_minigpt_with_lora(base_model(0), r=4, alpha=1.0, rank_pattern={"fc1": 2})
    load_adapter(wrapped, tmp_path)
    config = model_lora_config(wrapped)
    assert config.alpha == 8.0 and config.use_rslora is True
    assert all(layer.config is config for _, layer in lora_layers(wrapped))
    with torch.no_grad():
        assert torch.equal(wrapped.eval()(x), expected)


def test_top_level_exports():
    assert minituner.load_adapter is load_adapter and minituner.save_adapter is save_adapter


def test_rank_zero_adapter_saves_loads_and_says_peft_cannot(tmp_path):
    model = wrap_minigpt_with_lora(base_model(), r=0)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 0 and config["minituner"]["peft_loadable"] is False
    assert "PEFT" in config["minituner"]["note"]
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.blocks.0.mlp.fc1.lora_B.weight"].shape == (256, 0)
    plain = base_model()
    x = tokens()
    with torch.no_grad():
        reference = plain(x)
    load_adapter(plain, tmp_path)
    assert len(lora_layers(plain)) == 12
    with torch.no_grad():
        assert torch.equal(plain(x), reference)


# ----------------------------------------------------------------------------- refusals


def test_wrong_base_is_refused_and_model_unchanged(tmp_path):
    save_adapter(adapted_model(seed=0), tmp_path)
    other = base_model(seed=5)
    before = snapshot(other)
    with pytest.raises(ValueError, match="fingerprint mismatch.*strict=False"):
        load_adapter(other, tmp_path)
    assert_unchanged(other, before)
    wrapped = wrap_minigpt_with_lora(base_model(seed=5), r=4)
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(wrapped, tmp_path)
    assert_unchanged(wrapped, before)


def test_non_strict_warns_and_loads(tmp_path):
    model = adapted_model(seed=0)
    save_adapter(model, tmp_path)
    other = base_model(seed=5)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        load_adapter(other, tmp_path, strict=False)
    saved = lora_state_dict(model)
    assert all(torch.equal(saved[k], v) for k, v in lora_state_dict(other).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(base_model(seed=0), tmp_path)  # matching base: no warning


def test_truncated_weights_give_one_line_error_naming_file(tmp_path):
    save_adapter(adapted_model(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    for model in (base_model(), wrap_minigpt_with_lora(base_model(), r=4)):
        before = snapshot(model)
        with pytest.raises(ValueError) as info:
            load_adapter(model, tmp_path)
        message = str(info.value)
        assert "adapter_model.safetensors" in message and "\n" not in message
        assert_unchanged(model, before)


def test_bad_config_and_missing_files(tmp_path):
    save_adapter(adapted_model(), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    original = config_path.read_text()
    config_path.write_text(original[:40])
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(base_model(), tmp_path)
    config = json.loads(original)
    for field, value in (("use_dora", "yes"), ("fan_in_fan_out", True), ("bias", "all"),
                         ("r", -1), ("lora_alpha", 0), ("peft_type", "IA3")):
        config_path.write_text(json.dumps({**config, field: value}))
        model = base_model()
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf": {field}\b"):
            load_adapter(model, tmp_path)
        assert_unchanged(model, before)
    config_path.write_text(json.dumps({**config, "some_future_field": [1, 2]}))
    load_adapter(base_model(), tmp_path)  # unknown fields are ignored
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(base_model(), tmp_path)


def test_key_and_shape_mismatches_are_refused(tmp_path):
    save_adapter(adapted_model(r=4), tmp_path)
    for model in (wrap_minigpt_with_lora(base_model(), r=8),
                  apply_lora(base_model(), ["q_proj"], r=4)):
        before = snapshot(model)
        with pytest.raises(ValueError, match="adapter_model.safetensors"):
            load_adapter(model, tmp_path)
        assert_unchanged(model, before)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="rank 4, the config says 8"):
        load_adapter(base_model(), tmp_path)


def test_save_refuses_unwrapped_or_merged(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_adapter(base_model(), tmp_path)
    model = adapted_model()
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- PEFT


@pytest.fixture(scope="module")
def peft():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("peft", reason="PEFT is in the [hf] extra")


@pytest.mark.slow
def test_peft_reads_minituner_adapter(tmp_path, peft):
    from peft.utils import set_peft_model_state_dict

    model = adapted_model(r=4, alpha_pattern={"fc2": 5.0})
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores the "minituner" section
        config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 16.0, "gaussian")
    assert set(config.target_modules) == set(MINIGPT_TARGETS)
    assert config.alpha_pattern == {"fc2": 5.0} and config.peft_type.value == "LORA"
    config.task_type = None  # Mini-GPT is a plain nn.Module, not a transformers model
    peft_model = peft.get_peft_model(base_model(0), config)
    result = set_peft_model_state_dict(
        peft_model, load_file(tmp_path / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("use_rslora", [False, True])
def test_minituner_reads_peft_adapter(tmp_path, peft, use_rslora):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False,
        rank_pattern={"fc1": 2}, alpha_pattern={"blocks.1.attn.q_proj": 3}, use_rslora=use_rslora,
    )
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(base_model(0), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "minituner" not in saved and saved["init_lora_weights"] is False
    model = load_adapter(base_model(0), tmp_path).eval()
    assert [n for n, _ in lora_layers(model)] == [
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.q_proj", "attn.v_proj", "mlp.fc1")]
    assert model.blocks[0].mlp.fc1.r == 2 and model.blocks[1].attn.q_proj.alpha == 3.0
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=0, atol=1e-6)
        assert (model(x) - base_model(0)(x)).abs().max() > 1e-3  # the adapter is not a no-op


def test_lora_config_survives_save_and_load(tmp_path):
    model = adapted_model(r=4, alpha=8.0, use_rslora=True, rank_pattern={"fc1": 2},
                          init="kaiming")
    saved = model_lora_config(model)
    save_adapter(model, tmp_path)
    loaded = model_lora_config(load_adapter(base_model(0), tmp_path))
    assert loaded.to_dict() == {**saved.to_dict(), "seed": None}  # the seed is not a weight
    assert loaded.rank_pattern == {"fc1": 2} and loaded.init == "kaiming"
