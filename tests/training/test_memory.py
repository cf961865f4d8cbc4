"""The memory planner: model specs, exact Mini-GPT tensor counts, the QLoRA 65B claim, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from minituner.cli import main
from minituner.lora import wrap_minigpt_with_lora
from minituner.models.minigpt import MiniGPT, MiniGPTConfig, expected_param_count
from minituner.models.specs import MODEL_SPECS, model_spec, spec_from_hf_config
from minituner.quant.nf4 import quantize_nf4
from minituner.quant.qlora import QuantizedLinear, wrap_minigpt_qlora
from minituner.training.accounting import training_state_bytes
from minituner.training.loop import build_optimizer
from minituner.training.memory import (
    GB,
    base_weight_bytes,
    course_table,
    full_ft_state_bytes,
    nf4_storage_bytes,
    plan_memory,
    qlora_paper_settings,
)

# ----------------------------------------------------------------------------- specs


def test_minigpt_spec_matches_the_model():
    spec = model_spec("minigpt")
    assert spec.n_params() == expected_param_count(MiniGPTConfig()) == 103_680
    assert spec.n_params() == sum(p.numel() for p in MiniGPT().parameters())
    linears = [(n, m) for n, m in MiniGPT().named_modules() if isinstance(m, nn.Linear)]
    assert spec.linear_weight_params() == sum(m.weight.numel() for _, m in linears)
    assert len(spec.block_linears()) * spec.n_layers == len(linears) == 12


def test_published_parameter_counts():
    counts = {name: MODEL_SPECS[name].n_params() for name in MODEL_SPECS}
    assert counts["gpt2-small"] == 124_439_808
    assert counts["llama-7b"] == 6_738_415_616
    assert counts["llama-13b"] == 13_015_864_320
    assert abs(counts["llama-33b"] - 32.5e9) < 0.1e9
    assert counts["llama-65b"] == 65_285_660_672


@pytest.mark.slow
def test_specs_match_transformers_models_and_configs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048)
    for config, cls, name in [(GPT2Config(), GPT2LMHeadModel, "gpt2-small"),
                              (llama, LlamaForCausalLM, "llama-7b")]:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in cls(config).parameters())
        config.save_pretrained(tmp_path / name)
        spec = model_spec(f"hf:{tmp_path / name}")
        assert spec.n_params() == MODEL_SPECS[name].n_params() == n_params


def test_hf_config_reading_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024,
        "vocab_size": 1000, "max_position_embeddings": 256}))
    spec = spec_from_hf_config(tmp_path)
    assert spec.kv_dim == 128 and spec.gated_mlp and not spec.tied_head
    per_block = 2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1024 + 2 * 512
    assert spec.n_params() == 2 * 1000 * 512 + 4 * per_block + 512
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_spec(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="t5"):
        spec_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        spec_from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        model_spec("gpt5")


# ----------------------------------------------------------------------------- exact Mini-GPT


def _model_loss(model: nn.Module, batch: dict) -> tuple:
    _, loss = model(batch["input_ids"], batch["targets"])
    return loss, 1


def measure_training_bytes(model: nn.Module, batch: int = 16, seq: int = 32) -> dict:
    """Exact tensor bytes of one AdamW training step, from :mod:`minituner.training.accounting`.

    ``weights`` is counted per layer, as the planner and the bitsandbytes layout count them:
    each NF4 layer's code map and fp32 offset included. ``weights_in_memory`` is accounting's
    count, each storage once (the standard code map is one tensor shared by every NF4 layer,
    and the offset is a Python float, not a tensor).
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            weights += module.storage_bytes()  # codes, scales, maps, offset and bias
        else:
            weights += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, 64, (batch, seq), generator=g) for _ in range(2))
    step = {"input_ids": tokens, "targets": targets}
    optimizer = build_optimizer(model, lr=1e-3)
    _model_loss(model, step)[0].backward()
    optimizer.step()  # the AdamW state exists from the first step on
    exact = training_state_bytes(model, optimizer, _model_loss, step)
    return {"weights": weights,
            "weights_in_memory": exact["parameters_trainable_bytes"]
            + exact["frozen_weight_bytes"],
            "gradients": exact["gradient_bytes"], "optimizer": exact["optimizer_state_bytes"],
            "saved_activations": exact["saved_activation_bytes"],
            "dequant_buffer": exact["dequant_scratch_bytes"]}


ACTIVATION_TOLERANCE = 0.02  # the planner's saved-activation bytes vs autograd's, relative


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_planner_matches_exact_minigpt_tensor_bytes(method):
    torch.manual_seed(0)
    model = {"full": MiniGPT, "lora": lambda: wrap_minigpt_with_lora(MiniGPT(), seed=0),
             "qlora": lambda: wrap_minigpt_qlora(MiniGPT(), seed=0)}[method]()
    measured = measure_training_bytes(model)
    plan = plan_memory("minigpt", method, rank=8, batch=16, seq=32, base_dtype="fp32",
                       compute_dtype="fp32")
    assert plan.buckets["weights"] == measured["weights"]
    nf4 = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    shared = sum(m.code.numel() * m.code.element_size() for m in nf4[1:]) + 4 * len(nf4)
    assert measured["weights"] - measured["weights_in_memory"] == shared  # 0 without NF4
    assert plan.buckets["gradients"] == measured["gradients"]
    assert plan.buckets["optimizer"] == measured["optimizer"]
    predicted_saved = (plan.details["activations.saved_blocks"]
                       + plan.details["activations.saved_head_and_loss"])
    assert abs(predicted_saved - measured["saved_activations"]) <= (
        ACTIVATION_TOLERANCE * measured["saved_activations"])
    assert plan.details.get("activations.dequant_buffer", 0) == measured["dequant_buffer"]


def test_nf4_storage_formula_matches_stored_tensors():
    for shape in [(64, 64), (256, 64), (7, 9), (100, 300)]:
        for double_quant in (False, True):
            q = quantize_nf4(torch.randn(shape), double_quant=double_quant)
            numel = shape[0] * shape[1]
            assert nf4_storage_bytes(numel, 64, double_quant) == q.storage_bytes()


# ----------------------------------------------------------------------------- course facts


def test_full_finetuning_is_16_bytes_per_parameter():
    assert full_ft_state_bytes(7_000_000_000) == 112 * GB
    plan = plan_memory("llama-7b", "full-mixed", batch=1, seq=16)
    assert plan.buckets["weights"] - plan.details["weights.buffers"] == 6 * plan.assumptions[
        "n_params"]
    assert plan.buckets["gradients"] == 2 * plan.assumptions["n_params"]
    state = plan.total_bytes - plan.buckets["activations"] - plan.details["weights.buffers"]
    state -= plan.details["optimizer.step_counters"]
    assert state == full_ft_state_bytes(plan.assumptions["n_params"])


def test_65b_base_sizes_and_double_quant_saving():
    assert base_weight_bytes(65e9, "fp16") / GB == 130
    assert 33 < base_weight_bytes(65e9, "nf4-dq") / GB < 34
    saving = base_weight_bytes(65e9, "nf4") - base_weight_bytes(65e9, "nf4-dq")
    assert 2.9 < saving / GB < 3.2  # "about 3 GB"
    with pytest.raises(ValueError, match="fmt"):
        base_weight_bytes(10, "int3")


def _paper(model: str, **changes):
    settings = {**qlora_paper_settings(), **changes}
    return plan_memory(model, settings.pop("method"), **settings)


def test_qlora_65b_fits_48gb_and_16bit_lora_does_not():
    qlora = _paper("llama-65b")
    assert 0.75e9 < qlora.assumptions["trainable_params"] < 0.85e9  # ~0.8B adapter parameters
    assert 44 * GB < qlora.total_bytes < 46.5 * GB  # about 45 GB
    assert qlora.total_bytes < 48 * GB
    assert 33 * GB < qlora.details["weights.nf4_linears"] < 34 * GB
    assert qlora.buckets["optimizer"] > qlora.buckets["gradients"]  # fp32 Adam vs bf16 grads
    lora = _paper("llama-65b", method="lora")
    assert lora.total_bytes > 48 * GB and lora.buckets["weights"] > 130 * GB
    assert _paper("llama-7b").total_bytes < 10 * GB


def test_activation_options_change_what_they_should():
    plain = plan_memory("llama-7b", "qlora", batch=4, seq=1024)
    checkpointed = plan_memory("llama-7b", "qlora", batch=4, seq=1024, grad_checkpointing=True)
    eager = plan_memory("llama-7b", "qlora", batch=4, seq=1024, attention="eager")
    assert checkpointed.buckets["activations"] < plain.buckets["activations"] / 5
    scores = 32 * 4 * 1024 * 1024 * (4 + 2) * 32  # fp32 softmax + bf16 probabilities per layer
    lse = 4 * 32 * 4 * 1024 * 32  # what sdpa saves instead: fp32 log-sum-exp per head
    assert eager.buckets["activations"] - plain.buckets["activations"] == scores - lse
    for bucket in ("weights", "gradients", "optimizer"):
        assert checkpointed.buckets[bucket] == plain.buckets[bucket] == eager.buckets[bucket]
    doubled = plan_memory("llama-7b", "qlora", batch=8, seq=1024)
    per_token = [p.buckets["activations"] - p.details["activations.dequant_buffer"] - 8
                 for p in (plain, doubled)]  # 8: two scalars of the loss
    assert per_token[1] == 2 * per_token[0]


def test_modules_trained_in_full_add_a_copy_its_gradient_and_adam_state():
    plain = plan_memory("llama-7b", "lora", batch=1, seq=512)
    head = 32000 * 4096  # lm_head trained in full (modules_to_save), bf16
    saved = plan_memory("llama-7b", "lora", batch=1, seq=512, trained_modules_params=head)
    added = {k: saved.buckets[k] - plain.buckets[k] for k in plain.buckets}
    assert added == {"weights": 2 * head, "gradients": 2 * head, "optimizer": 4 * head,
                     "activations": 0}
    with pytest.raises(ValueError, match="trained_modules_params is for lora and qlora"):
        plan_memory("llama-7b", "full", trained_modules_params=head)
    with pytest.raises(ValueError, match="trained_modules_params"):
        plan_memory("llama-7b", "lora", trained_modules_params=-1)


def test_planner_rejects_bad_settings():
    with pytest.raises(ValueError, match="method"):
        plan_memory("minigpt", "prefix-tuning")
    with pytest.raises(ValueError, match="unknown planner setting"):
        plan_memory("minigpt", "lora", ranks=8)
    with pytest.raises(ValueError, match="seq"):
        plan_memory("gpt2-small", "lora", seq=2048)
    with pytest.raises(ValueError, match="compute_dtype"):
        plan_memory("minigpt", "lora", compute_dtype="fp8")
    with pytest.raises(ValueError, match="batch"):
        plan_memory("minigpt", "lora", batch=0)


def test_course_table():
    rows = {row["regime"]: row for row in course_table()}
    assert list(rows) == ["full fine-tuning", "LoRA r=4", "LoRA r=8", "LoRA r=16", "QLoRA r=8"]
    activations = 16 * 32 * 64 * 2 * 16
    full = rows["full fine-tuning"]
    assert full["total"] == 16 * 103_680 + activations and full["activations"] == activations
    assert rows["LoRA r=8"]["trainable_params"] == 18_432
    assert rows["LoRA r=4"]["total"] < rows["LoRA r=8"]["total"] < rows["LoRA r=16"]["total"]
    assert rows["QLoRA r=8"]["weights"] < rows["LoRA r=8"]["weights"]
    assert all(row["total"] == sum(row[k] for k in ("weights", "gradients", "optimizer",
                                                     "activations")) for row in rows.values())


# ----------------------------------------------------------------------------- CLI


def test_cli_json(capsys):
    assert main(["memory", "--model", "llama-65b", "--qlora-paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["buckets"]) == {"weights", "gradients", "optimizer", "activations"}
    assert out["total_bytes"] == sum(out["buckets"].values()) and out["total_bytes"] < 48 * GB
    assert out["assumptions"]["rank"] == 64 and out["assumptions"]["grad_checkpointing"]
    assert all(isinstance(v, int) for v in out["buckets"].values())


def test_cli_table_and_course_table(capsys):
    assert main(["memory", "--model", "gpt2-small", "--method", "lora", "--rank", "8",
                 "--batch", "4", "--seq", "128", "--grad-checkpointing"]) == 0
    text = capsys.readouterr().out
    assert "GB" in text and "GiB" in text and "gradient checkpointing" in text
    assert main(["memory", "--course-table"]) == 0
    text = capsys.readouterr().out
    assert "simplified" in text and "QLoRA r=8" in text


def test_cli_errors(capsys):
    assert main(["memory", "--model", "gpt5"]) == 1
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["memory", "--method", "adapters"])
    assert info.value.code == 2
