"""Fine-tuning transformers models: the run folder, resume after a crash, QLoRA, checkpointing."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hf_helpers import write_data
from safetensors.torch import load_file

from minituner.hf import load_hf_model
from minituner.hf.finetune import (
    NoGradientError,
    check_lora_gradients,
    enable_grad_checkpointing,
    run_hf_finetune,
)
from minituner.lora import apply_lora, lora_layers
from minituner.lora.adapters import load_adapter
from minituner.training.config import FinetuneConfig


def config(model_dir, data, **overrides) -> FinetuneConfig:
    settings = {"model": f"hf:{model_dir}", "train_data": str(data), "val_fraction": 0.25,
                "steps": 6, "batch_size": 4, "lr": 1e-2, "eval_every": 2, "checkpoint_every": 2,
                "warmup": 0.0, "rank": 4}
    return FinetuneConfig.for_kind("hf", **{**settings, **overrides})


def adapter_tensors(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_lora_run_folder_and_adapter(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl")
    results = run_hf_finetune(config(model_dir, data), tmp_path / "run", device="cpu")
    run = tmp_path / "run"
    for name in ("config.json", "manifest.json", "results.json", "train_log.jsonl", "loss.png",
                 "adapter/adapter_config.json", "data/train.jsonl", "data/validation.jsonl"):
        assert (run / name).is_file(), name
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all("val_loss" in r for r in log if r["step"] % 2 == 0)
    assert results["train_examples"] == 18 and results["validation_examples"] == 6
    assert results["device"] == "cpu" and results["compute_dtype"] == "fp32"
    assert log[-1]["val_loss"] < log[1]["val_loss"]  # it learns something
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True
    assert adapter_config["minituner"]["base"]["method"] == "lora"
    model = load_adapter(load_hf_model(model_dir), run / "adapter")
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in lora_layers(model))


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_same_adapter(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("llama")
    data = write_data(tmp_path / "data.jsonl", seed=1)
    cfg = config(model_dir, data)
    run_hf_finetune(cfg, tmp_path / "whole", device="cpu")

    def crash(record):
        if record["step"] == 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint

    with pytest.raises(KeyboardInterrupt):
        run_hf_finetune(config(model_dir, data), tmp_path / "crashed", on_step=crash,
                        device="cpu")
    assert not (tmp_path / "crashed" / "adapter").exists()
    results = run_hf_finetune(config(model_dir, data), tmp_path / "crashed", resume=True,
                              device="cpu")
    assert results["resumed_from_step"] == 4
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "crashed")
    assert whole.keys() == resumed.keys()
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) < 1e-6
    with pytest.raises(ValueError, match=r"cannot change finetune\.lr: run 0\.01, now 0\.005"):
        run_hf_finetune(config(model_dir, data, lr=5e-3), tmp_path / "crashed", resume=True,
                        device="cpu")


@pytest.mark.slow
def test_qlora_with_grad_checkpointing_trains_bf16(tmp_path, toy_hf_model):
    data = write_data(tmp_path / "data.jsonl", seed=2)
    cfg = config(toy_hf_model("gpt2"), data, method="qlora", grad_checkpointing=True,
                 dtype="bf16", steps=4, chat_template=True)
    results = run_hf_finetune(cfg, tmp_path / "run", device="cpu")
    assert results["compute_dtype"] == "bf16" and results["final_loss"] < 10
    base = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert base["minituner"]["base"] == {**base["minituner"]["base"], "method": "qlora",
                                         "compute_dtype": "bfloat16"}
    assert all(float(t.abs().sum()) > 0 for k, t in adapter_tensors(tmp_path / "run").items()
               if "lora_B" in k)


def test_reentrant_checkpointing_trap_is_caught(toy_hf_model):
    """Reentrant checkpointing of a block whose input needs no gradient silently starves that
    block's adapters of gradients; the check after the first step refuses to go on."""
    ids = torch.randint(7, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    model = apply_lora(load_hf_model(toy_hf_model("gpt2")), "all-linear", r=2, seed=0).train()
    block = model.transformer.h[0]
    block.gradient_checkpointing = True
    block._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                           use_reentrant=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # no error: silent
    with pytest.raises(NoGradientError, match=r"transformer\.h\.0\.attn\.c_attn"):
        check_lora_gradients(model, step=1)
    fixed = apply_lora(load_hf_model(toy_hf_model("gpt2")), "all-linear", r=2, seed=0).train()
    enable_grad_checkpointing(fixed)
    fixed(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    check_lora_gradients(fixed, step=1)


def test_bad_settings_are_one_line_errors(tmp_path, toy_hf_model):
    data = write_data(tmp_path / "data.jsonl")
    cases = [({"method": "full"}, "--method must be one of"),
             ({"max_len": 4096}, "--max-len 4096 exceeds the model's context of 128"),
             ({"targets": ["q_proj"]}, "'q_proj' matches no Linear"),
             ({"batch_size": 64}, "cannot fill one batch of 64")]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            run_hf_finetune(config(toy_hf_model("gpt2"), data, **overrides), tmp_path / "bad",
                            device="cpu")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("field, value", [("lr", "abc"), ("max_len", "x"), ("max_len", 8.5),
                                          ("val_fraction", "0.1x"), ("epochs", True),
                                          ("batch_size", True), ("weight_decay", None),
                                          ("grad_clip", "1 0"), ("steps", 2.0),
                                          ("use_rslora", "yes"), ("steps", "2.5")])
def test_settings_of_the_wrong_type_name_the_field(field, value):
    settings = {"model": "hf:m", "train_data": "d.jsonl", field: value}
    with pytest.raises(ValueError, match=rf"^finetune config: '{field}' must be") as info:
        FinetuneConfig.from_dict(settings).validate()
    assert "\n" not in str(info.value) and repr(value) in str(info.value)
    cfg = FinetuneConfig.for_kind("hf", model="hf:m", lr=1, warmup=0, max_len=8,
                                  val_fraction=0.5)
    assert cfg.validate() is cfg


@pytest.mark.parametrize("field, text, value", [("lr", "1e-3", 0.001), ("epochs", "2", 2.0),
                                                ("batch_size", "8", 8),
                                                ("val_fraction", "0.1", 0.1)])
def test_numbers_written_as_text_are_read_as_numbers(field, text, value):
    cfg = FinetuneConfig.from_dict({"model": "hf:m", field: text})
    assert getattr(cfg, field) == value and type(getattr(cfg, field)) is type(value)
