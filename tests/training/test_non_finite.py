"""NaN and inf never pass silently: training stops, loading refuses, merging writes nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hf_helpers import randomize_lora_b
from safetensors.torch import load_file, save_file

from minituner.cli import main
from minituner.course.pretraining import run_pretraining
from minituner.hf.load import base_record, load_quantized_hf_model
from minituner.hf.merge import merge_hf_adapter
from minituner.hf.models import load_hf_model
from minituner.lora import apply_lora, lora_layers, merge_lora, wrap_minigpt_with_lora
from minituner.lora.adapters import WEIGHTS_NAME, load_adapter, save_adapter
from minituner.quant.qlora import merge_quantized_lora, wrap_minigpt_qlora
from minituner.training.checkpoint import RunWriter, load_checkpoint
from minituner.training.config import PretrainConfig
from minituner.training.loop import LoopConfig, NonFiniteLossError, fit
from minituner.training.runs import load_model


def one_line_error(capsys, code: int) -> str:
    """The one error line (after any progress bar, which redraws with carriage returns)."""
    assert code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("minituner ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ----------------------------------------------------------------------------- training loops


def test_pretraining_with_an_exploding_lr_stops_and_writes_no_model(tmp_path):
    out = tmp_path / "base"
    cfg = PretrainConfig(steps=4, eval_every=2, batch_size=8, lr=1e30, warmup_steps=0)
    with pytest.raises(NonFiniteLossError, match="training stopped: .* at step 2"):
        run_pretraining(out, cfg)
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_pretrain_cli_with_an_exploding_lr_exits_with_one_line(tmp_path, capsys):
    out = tmp_path / "base"
    code = main(["pretrain", "--lr", "1e30", "--steps", "3", "--batch-size", "8",
                 "--out", str(out)])
    assert "training stopped: loss is nan at step 2" in one_line_error(capsys, code)
    assert not (out / "model.safetensors").exists()


def _overflowing_fit(steps: int, checkpoint_every: int, writer=None):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)

    def loss_fn(m, batch):
        return (m(batch["x"]) ** 2).sum(), 1

    def batches(k):
        return {"x": torch.full((1, 1), 10.0), "target_mask": torch.ones(1, 1, dtype=torch.bool)}

    optimizer = torch.optim.SGD(model.parameters(), lr=1e38)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loop = LoopConfig(steps=steps, grad_clip=None, checkpoint_every=checkpoint_every)
    return fit(model, loss_fn, batches, optimizer, scheduler, loop, writer=writer)


def test_an_update_that_overflows_the_weights_stops_before_the_checkpoint(tmp_path):
    # step 1's loss (100) is finite, but SGD at lr 1e38 sends the weight to -inf
    writer = RunWriter(tmp_path)
    with pytest.raises(NonFiniteLossError, match="trainable tensor weight is nan at step 1"):
        _overflowing_fit(steps=3, checkpoint_every=1, writer=writer)
    assert writer.latest() is None
    with pytest.raises(NonFiniteLossError, match="at step 1"):  # the last step too
        _overflowing_fit(steps=1, checkpoint_every=50)


# ----------------------------------------------------------------------------- loading


@pytest.fixture
def nan_adapter(tmp_path, tiny_base_run):
    """A Mini-GPT adapter folder whose one lora_B holds a NaN."""
    model, _, _ = load_model(tiny_base_run)
    model = wrap_minigpt_with_lora(model, r=4, seed=0)
    randomize_lora_b(model)
    save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter" / WEIGHTS_NAME
    tensors = load_file(path)
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = math.nan
    save_file(tensors, path, metadata={"format": "pt"})
    return tmp_path / "adapter", key


def test_an_adapter_with_a_nan_is_refused_naming_the_tensor(nan_adapter, tiny_base_run, capsys,
                                                            tmp_path):
    adapter, key = nan_adapter
    model, _, _ = load_model(tiny_base_run)
    with pytest.raises(ValueError, match=f"tensor {key} holds 1 non-finite value"):
        load_adapter(model, adapter)
    code = main(["eval", "--model", str(tiny_base_run), "--adapter", str(adapter)])
    assert key in one_line_error(capsys, code)
    out = tmp_path / "merged"
    code = main(["merge", "--model", str(tiny_base_run), "--adapter", str(adapter),
                 "--out", str(out)])
    assert key in one_line_error(capsys, code)
    assert not out.exists()


def test_a_checkpoint_with_a_nan_is_refused_naming_the_tensor(tmp_path):
    good = {"w": torch.ones(2, 2)}
    state = {"step": 4, "trainable": good, "best": {"state": None},
             "optimizer": {"state": {0: {"exp_avg": torch.zeros(2, 2)}}}}
    writer = RunWriter(tmp_path)
    assert load_checkpoint(writer.save_checkpoint(state))["step"] == 4
    cases = [("trainable w", {"trainable": {"w": torch.tensor([[1.0, math.inf]])}}),
             ("best w", {"best": {"state": {"w": torch.full((2, 2), math.nan)}}}),
             ("optimizer state 0.exp_avg",
              {"optimizer": {"state": {0: {"exp_avg": torch.full((2, 2), math.nan)}}}})]
    for step, (name, change) in enumerate(cases, start=5):
        path = writer.save_checkpoint({**state, **change, "step": step})
        with pytest.raises(ValueError, match=f"{path.name}: {name} holds non-finite values"):
            load_checkpoint(path)


# ----------------------------------------------------------------------------- merging


def test_merge_refuses_a_nan_adapter_and_an_overflowing_merge(tiny_base_run):
    model, _, _ = load_model(tiny_base_run)
    model = wrap_minigpt_with_lora(model, r=4, seed=0)
    name, layer = lora_layers(model)[2]
    with torch.no_grad():
        layer.lora_B[0, 0] = math.nan
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"^merge: tensor {name}.lora_B holds 1 non-finite"):
        merge_lora(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k], ) for k in before if "lora_B" not in k)
    with torch.no_grad():
        layer.lora_B.fill_(3e38)
        layer.lora_A.fill_(1.0)
    with pytest.raises(ValueError, match=f"^merged weights: tensor {name}.base.weight holds"):
        merge_lora(model)


def test_qlora_merge_refuses_a_nan_adapter(tiny_base_run):
    model, _, _ = load_model(tiny_base_run)
    model = wrap_minigpt_qlora(model, r=4, seed=0)
    name, layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_A[1, 1] = -math.inf
    for target in ("dequantized", "requantized"):
        with pytest.raises(ValueError, match=f"tensor {name}.lora_A holds 1 non-finite"):
            merge_quantized_lora(model, target=target)


def test_hf_merge_writes_nothing_when_the_merge_overflows(tmp_path, toy_hf_model):
    directory = toy_hf_model("llama")
    model = apply_lora(load_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
    name, layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(3e38)  # finite, but scaling * B @ A is not
    save_adapter(model, tmp_path / "adapter", extra=base_record(directory, "lora", torch.float32))
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=f"tensor {name}.base.weight holds"):
        merge_hf_adapter(None, tmp_path / "adapter", out)
    assert not out.exists()
    model = apply_lora(load_quantized_hf_model(directory), "all-linear", r=4, alpha=8, seed=0)
    randomize_lora_b(model)
    with torch.no_grad():
        lora_layers(model)[1][1].lora_B[0, 0] = math.nan
    save_adapter(model, tmp_path / "qadapter", extra=base_record(directory, "qlora",
                                                                  torch.float32))
    with pytest.raises(ValueError, match="lora_B.weight holds 1 non-finite"):
        merge_hf_adapter(None, tmp_path / "qadapter", out, target="requantized")
    assert not out.exists()
