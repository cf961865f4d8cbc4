"""QLoRA on transformers models: quantize-while-loading, and bitsandbytes round trips both ways."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import logits_of, randomize_lora_b, token_batch

from minituner.hf import TanhGELU, hf_targets, load_hf_model
from minituner.hf.load import TensorSource, load_quantized_hf_model
from minituner.hf.save import export_state_dict, save_hf_model
from minituner.lora import apply_lora, is_fan_in_fan_out, lora_layers
from minituner.lora.adapters import load_adapter, save_adapter
from minituner.quant.nf4 import quantize_nf4
from minituner.quant.qlora import QuantizedLinear, quantization_summary

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def bnb_config():
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def bnb_model(directory):
    """The model quantized by transformers + bitsandbytes (CPU 4-bit loading works in 0.50.2)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), quantization_config=bnb_config(), device_map="cpu")


def bnb_logits(model, ids):
    """Logits of a bitsandbytes model through its exact path (dequantize + fp32 GEMM).

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weight on its first
    eval-mode, no-grad forward and then computes in bf16 (about 1e-3 off on these logits); a
    training-mode forward with autograd on keeps the exact path. Dropout is 0 in these models.
    """
    model.train()
    with torch.enable_grad():
        return model(input_ids=ids, use_cache=False).logits.detach().float()


@torch.no_grad()
def dequantized_reference(directory):
    """The float model with every all-linear weight replaced by its NF4 round trip."""
    model = load_hf_model(directory)
    for name in hf_targets(model):
        module = model.get_submodule(name)
        weight = module.weight.t() if is_fan_in_fan_out(module) else module.weight
        back = quantize_nf4(weight.contiguous()).dequantize()
        module.weight.copy_(back.t() if is_fan_in_fan_out(module) else back)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_quantize_while_loading_matches_nf4_round_trip(arch, toy_hf_model):
    directory, ids = toy_hf_model(arch), token_batch()
    model = load_quantized_hf_model(directory)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(hf_targets(load_hf_model(directory)))
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_output_embeddings().weight.dtype == torch.float32  # the head stays float
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
        assert isinstance(model.transformer.h[0].mlp.act, TanhGELU)  # fused, as load_hf_model
        assert model.transformer.h[0].attn.c_attn.source_fan_in_fan_out
        assert (model.transformer.h[0].attn.c_attn.out_features,
                model.transformer.h[0].attn.c_attn.in_features) == (192, 64)
    expected = logits_of(dequantized_reference(directory), ids)
    assert (logits_of(model, ids) - expected).abs().max() < 1e-5


def test_loading_reads_one_tensor_at_a_time(toy_hf_model, monkeypatch):
    """Every checkpoint tensor is read once, and each float target weight is quantized before
    the next tensor is read (so at most one full-precision weight is alive at a time)."""
    directory = toy_hf_model("gpt2")
    reads, quantized_after = [], []
    original_get = TensorSource.get

    def get(self, key):
        reads.append(key)
        return original_get(self, key)

    import minituner.hf.load as hf_load

    original_quantize = hf_load.quantize_nf4

    def quantize(weight, **kwargs):
        quantized_after.append(reads[-1])
        return original_quantize(weight, **kwargs)

    monkeypatch.setattr(TensorSource, "get", get)
    monkeypatch.setattr(hf_load, "quantize_nf4", quantize)
    load_quantized_hf_model(directory)
    assert len(reads) == len(set(reads)) == len(TensorSource(directory).keys())
    assert len(quantized_after) == 8 and all(k.endswith(".weight") for k in quantized_after)


def test_bitsandbytes_quantizes_the_same_bytes(toy_hf_model):
    directory = toy_hf_model("gpt2")
    ours = load_quantized_hf_model(directory).state_dict()
    theirs = bnb_model(directory).state_dict()
    suffixes = (".weight.absmax", ".weight.nested_absmax", ".weight.quant_map")
    quantized = [k for k in ours if (k.endswith(".weight") and ours[k].dtype == torch.uint8)
                 or k.endswith(suffixes)]
    assert len(quantized) == 8 * 4
    for key in quantized:
        assert torch.equal(ours[key].reshape(-1), theirs[key].reshape(-1)), key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_minituner_quantized_model_loads_in_bitsandbytes(arch, tmp_path, toy_hf_model):
    directory, ids = toy_hf_model(arch), token_batch()
    model = load_quantized_hf_model(directory)
    expected = logits_of(model, ids)
    save_hf_model(model, tmp_path / "nf4")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"),
                                                               device_map="cpu")
    linear4bit = [m for m in loaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == len(hf_targets(load_hf_model(directory)))
    assert (bnb_logits(loaded, ids) - expected).abs().max() < 1e-5


def test_exported_state_dict_loads_into_linear4bit_layers(toy_hf_model):
    """Layer by layer: bnb.nn.Linear4bit built from minituner's tensors gives the same output."""
    model = load_quantized_hf_model(toy_hf_model("llama"))
    state = export_state_dict(model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear) or layer.in_features != 64:
            continue
        prefix = f"{name}.weight."
        stats = {k[len(f"{name}."):]: v for k, v in state.items() if k.startswith(prefix)}
        target = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False,
                                   compute_dtype=torch.float32, quant_type="nf4")
        target.weight = bnb.nn.Params4bit.from_prequantized(
            data=state[f"{name}.weight"], quantized_stats=stats, requires_grad=False,
            device="cpu", module=target)
        assert (target(x) - layer(x)).abs().max() < 1e-5, name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bitsandbytes_quantized_model_loads_in_minituner(arch, tmp_path, toy_hf_model):
    directory, ids = toy_hf_model(arch), token_batch()
    reference = bnb_model(directory)
    expected = bnb_logits(reference, ids)
    reference.save_pretrained(str(tmp_path / "bnb"))
    model = load_quantized_hf_model(tmp_path / "bnb")
    summary = quantization_summary(model)
    assert summary["prequantized"] and summary["double_quant"]
    assert (logits_of(model, ids) - expected).abs().max() < 1e-5
    ours = export_state_dict(model)
    theirs = reference.state_dict()
    packed = [k for k in ours if k.endswith(".weight") and ours[k].dtype == torch.uint8]
    assert packed and all(torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in packed)


def test_qlora_adapter_round_trip_and_peft_on_bitsandbytes(tmp_path, toy_hf_model):
    """A QLoRA adapter trained on minituner's NF4 GPT-2 loads in PEFT over bitsandbytes' NF4
    GPT-2 (same bytes) with the same logits, and back into minituner."""
    peft = pytest.importorskip("peft")
    directory, ids = toy_hf_model("gpt2"), token_batch()
    model = apply_lora(load_quantized_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
    randomize_lora_b(model)
    expected = logits_of(model, ids)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(bnb_model(directory), tmp_path / "adapter")
    assert (bnb_logits(peft_model, ids) - expected).abs().max() < 1e-5
    again = load_adapter(load_quantized_hf_model(directory), tmp_path / "adapter")
    assert (logits_of(again, ids) - expected).abs().max() < 1e-6
    assert len(lora_layers(again)) == 8
