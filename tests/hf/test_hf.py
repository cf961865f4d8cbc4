"""LoRA on transformers models: GPT-2 Conv1D, Llama-family Linears, PEFT round trips both ways."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf import (
    TanhGELU,
    apply_hf_lora,
    fuse_activations,
    hf_targets,
    load_hf_model,
    load_hf_tokenizer,
    read_hf_config,
    resolve_device,
    resolve_dtype,
)
from minituner.lora import (
    LoRALinear,
    apply_lora,
    is_fan_in_fan_out,
    linear_features,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.training.accounting import step_tensor_bytes

peft = pytest.importorskip("peft")
GPT2_TARGETS = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_conv1d_is_wrapped_fan_in_fan_out(toy_hf_model):
    model = load_hf_model(toy_hf_model("gpt2"))
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and is_fan_in_fan_out(conv)
    assert linear_features(conv) == (64, 192)
    assert not is_fan_in_fan_out(model.lm_head)
    names = hf_targets(model)
    assert len(names) == 8 and names[:4] == GPT2_TARGETS
    assert "lm_head" not in names  # the tied head is never an all-linear target


def test_gpt2_lora_forward_merge_unmerge_unload(toy_hf_model):
    ids = token_batch()
    base = load_hf_model(toy_hf_model("gpt2"))
    expected_base = logits_of(base, ids)
    model = apply_lora(base, "all-linear", r=4, alpha=8, seed=0)
    assert torch.equal(logits_of(model, ids), expected_base)  # B = 0: exactly the base
    randomize_lora_b(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert layer.delta_weight().shape == layer.base.weight.shape == (64, 192)
    adapted = logits_of(model, ids)
    assert (adapted - expected_base).abs().max() > 1e-3
    merge_lora(model)
    assert (logits_of(model, ids) - adapted).abs().max() < 1e-5
    unmerge_lora(model)
    assert (logits_of(model, ids) - adapted).abs().max() < 1e-5
    merged = merge_and_unload(model)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not lora_layers(merged)
    assert (logits_of(merged, ids) - adapted).abs().max() < 1e-5


def test_lora_trains_only_adapters_on_llama(toy_hf_model):
    names = hf_targets(load_hf_model(toy_hf_model("llama")))
    assert len(names) == 14 and "lm_head" not in names  # untied head: still never a target
    model = apply_hf_lora(load_hf_model(toy_hf_model("llama")), "q_proj,v_proj", r=2)
    assert len(lora_layers(model)) == 4
    ids = token_batch()
    model.train()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_unmatched_target_lists_linear_names(toy_hf_model):
    model = load_hf_model(toy_hf_model("gpt2"))
    with pytest.raises(ValueError) as info:
        apply_hf_lora(model, ["q_proj"])
    message = str(info.value)
    assert "'q_proj' matches no Linear" in message and "transformer.h.1.mlp.c_fc" in message
    assert "\n" not in message


def test_unsupported_architecture_lists_supported(tmp_path, toy_hf_model):
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as info:
        read_hf_config(f"hf:{directory}")
    message = str(info.value)
    assert "unsupported architecture 'bert'" in message
    assert "gpt2, llama, mistral, qwen2, qwen3" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        read_hf_config(f"hf:{tmp_path / 'nowhere'}")


def test_device_and_dtype_defaults():
    cpu = resolve_device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(ValueError, match=r"--device must be auto, cpu or cuda\[:N\], got 'gpu'"):
        resolve_device("gpu")  # torch.device("gpu") itself raises RuntimeError


def copy_model(source, target, files=("config.json", "model.safetensors")):
    """A model directory holding only ``files`` of ``source``."""
    target.mkdir()
    for name in files:
        shutil.copy(source / name, target / name)
    return target


def test_corrupt_weights_are_one_line(tmp_path, toy_hf_model):
    directory = copy_model(toy_hf_model("gpt2"), tmp_path / "corrupt")
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot load the model") as info:
        load_hf_model(directory)
    assert "\n" not in str(info.value)


def test_folder_without_tokenizer_is_refused(tmp_path, toy_hf_model):
    directory = copy_model(toy_hf_model("gpt2"), tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match=r"no tokenizer files \(tokenizer\.json or "
                                         r"tokenizer_config\.json\)"):
        load_hf_tokenizer(directory)
    assert len(load_hf_tokenizer(toy_hf_model("gpt2"))) > 1


# ----------------------------------------------------------------------------- PEFT round trips

CASES = {
    "gpt2": {"targets": "all-linear", "rank_pattern": {"c_fc": 6}, "alpha_pattern": {"c_attn": 3}},
    "llama": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"],
              "rank_pattern": {"down_proj": 6}, "alpha_pattern": {"q_proj": 3}},
}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_minituner_adapter_loads_in_peft(arch, use_rslora, tmp_path, toy_hf_model):
    case, directory, ids = CASES[arch], toy_hf_model(arch), token_batch()
    model = apply_hf_lora(
        load_hf_model(directory), case["targets"], r=4, alpha=8, use_rslora=use_rslora,
        rank_pattern=case["rank_pattern"], alpha_pattern=case["alpha_pattern"], seed=0,
    )
    randomize_lora_b(model)
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    key = ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" if arch == "gpt2"
           else "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    from safetensors.torch import load_file

    assert key in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "adapter")
    assert (logits_of(peft_model, ids) - expected).abs().max() < 1e-5
    assert (expected - logits_of(load_hf_model(directory), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_minituner(arch, use_rslora, tmp_path, toy_hf_model):
    case, directory, ids = CASES[arch], toy_hf_model(arch), token_batch()
    targets = (["c_attn", "c_proj", "c_fc"] if case["targets"] == "all-linear"
               else case["targets"])
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora,
        rank_pattern=case["rank_pattern"], alpha_pattern=case["alpha_pattern"],
        init_lora_weights=False, task_type="CAUSAL_LM",  # False: B random, so logits move
    )
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(load_hf_model(directory), config)
    expected = logits_of(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(load_hf_model(directory), tmp_path / "peft")
    assert (logits_of(model, ids) - expected).abs().max() < 1e-5
    ranks = {name.rsplit(".", 1)[-1]: layer.r for name, layer in lora_layers(model)}
    assert ranks[list(case["rank_pattern"])[0]] == 6
    assert (expected - logits_of(load_hf_model(directory), ids)).abs().max() > 1e-3


def test_adapter_from_another_base_is_refused(tmp_path, toy_hf_model):
    model = apply_hf_lora(load_hf_model(toy_hf_model("gpt2", seed=0)), "all-linear", r=2)
    save_adapter(model, tmp_path / "adapter")
    other = load_hf_model(toy_hf_model("gpt2", seed=1))
    with pytest.raises(ValueError, match="fingerprint mismatch") as info:
        load_adapter(other, tmp_path / "adapter")
    assert "\n" not in str(info.value)
    assert not lora_layers(other)
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        load_adapter(load_hf_model(toy_hf_model("llama")), tmp_path / "adapter")


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward of one training forward."""
    def loss_fn(model, batch):
        return model(input_ids=batch["input_ids"], use_cache=False).logits.float().sum(), 1

    model.train()
    return step_tensor_bytes(model, loss_fn, {"input_ids": ids})["saved_activation_bytes"]


def test_gpt2_gelu_is_fused_with_the_same_logits_and_less_saved(toy_hf_model):
    from transformers import AutoModelForCausalLM

    directory = toy_hf_model("gpt2")
    ours = load_hf_model(directory)
    plain = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    n_layers = plain.config.n_layer
    assert sum(isinstance(m, TanhGELU) for m in ours.modules()) == n_layers
    assert not any(type(m).__name__ == "NewGELUActivation" for m in ours.modules())
    ids = token_batch()
    assert torch.allclose(logits_of(ours, ids), logits_of(plain, ids), atol=1e-5, rtol=0)
    plain.requires_grad_(False)
    ours.requires_grad_(False)
    for model in (ours, plain):  # a trainable input so that every layer saves activations
        model.transformer.wte.weight.requires_grad_(True)
    assert _saved_bytes(ours, ids) < _saved_bytes(plain, ids)
    assert fuse_activations(plain) == n_layers and fuse_activations(plain) == 0


def test_llama_activations_are_left_alone(toy_hf_model):
    model = load_hf_model(toy_hf_model("llama"))
    assert fuse_activations(model) == 0
    assert not any(isinstance(m, TanhGELU) for m in model.modules())
