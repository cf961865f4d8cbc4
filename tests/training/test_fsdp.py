"""FSDP2 (--fsdp): 2 CPU processes under torchrun (gloo) shard a LoRA or QLoRA run and save the
adapter one process saves without FSDP; a sharded run's checkpoint resumes on 1 and on 2
processes; the bad inputs are one line each."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hf_helpers import write_data
from test_distributed import adapter, max_diff, torchrun

from minituner.cli import main
from minituner.training.distributed import DistInfo
from minituner.training.fsdp import check_fsdp_blocks, clip_gradients, full_tensors


def command(model_dir, data, out, method: str, *extra) -> list:
    return ["finetune", "--model", f"hf:{model_dir}", "--data", str(data), "--method", method,
            "--val-fraction", "0.25", "--steps", "5", "--batch-size", "4", "--lr", "0.005",
            "--eval-every", "2", "--checkpoint-every", "2", "--warmup", "0", "--rank", "4",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fsdp_lora_and_qlora_match_one_process(tmp_path, toy_hf_model, arch):
    model_dir = toy_hf_model(arch)
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)
    for method in ("lora", "qlora"):
        one, two = tmp_path / f"one-{method}", tmp_path / f"two-{method}"
        assert main(command(model_dir, data, one, method)) == 0
        torchrun([*command(model_dir, data, two, method), "--fsdp"], processes=2)
        assert max_diff(adapter(one), adapter(two)) < 1e-5, method
        assert max(float(t.abs().max()) for k, t in adapter(one).items()
                   if "lora_B" in k) > 1e-3  # the adapter moved


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_and_on_two_processes(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)
    whole = tmp_path / "whole"
    constant = ["--lr-scheduler", "constant"]  # a run stopped at step 3 has step 5's schedule
    torchrun([*command(model_dir, data, whole, "qlora", *constant), "--fsdp"], processes=2)
    for processes in (1, 2):
        out = tmp_path / f"resumed-{processes}"
        torchrun([*command(model_dir, data, out, "qlora", *constant), "--fsdp", "--steps", "3"],
                 processes=2)  # the same run, stopped after its step-2 checkpoint
        for late in ("checkpoints/step-000003.pt", "results.json"):
            (out / late).unlink()
        args = [*command(model_dir, data, out, "qlora", *constant), "--resume"]
        if processes == 1:
            assert main(args) == 0
        else:
            torchrun([*args, "--fsdp"], processes=2)
        assert max_diff(adapter(whole), adapter(out)) < 1e-6, processes


def test_fsdp_without_torchrun_is_one_line(tmp_path, toy_hf_model, capsys):
    data = write_data(tmp_path / "data.jsonl", n=8, seed=5)
    code = main([*command(toy_hf_model("gpt2"), data, tmp_path / "out", "lora"), "--fsdp"])
    err = capsys.readouterr().err
    assert code != 0 and "--fsdp needs torchrun" in err and "Traceback" not in err


def test_more_processes_than_blocks_is_refused():
    with pytest.raises(ValueError, match="4 processes but the model has only 2 blocks"):
        check_fsdp_blocks([nn.Linear(2, 2)] * 2, DistInfo(rank=0, world_size=4))
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        check_fsdp_blocks([], DistInfo(rank=0, world_size=2))


def test_unsharded_helpers_match_torch():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    expected = [p.grad.clone() for p in params]
    total = float(torch.nn.utils.clip_grad_norm_([nn.Parameter(p.detach()) for p in params], 1))
    norm = clip_gradients(params, 1.0)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in expected]))))
    assert total == pytest.approx(norm) or total >= 0
    assert full_tensors([("a", params[0])])["a"].data_ptr() != params[0].data_ptr()


def test_planner_shards_state_and_adds_gathered_units():
    from minituner.training.memory import plan_memory, qlora_paper_settings

    settings = qlora_paper_settings()
    method = settings.pop("method")
    one = plan_memory("llama-65b", method, **settings)
    assert plan_memory("llama-65b", method, **settings, devices=1, fsdp=True).total_bytes == \
        one.total_bytes  # one device gathers nothing
    two = plan_memory("llama-65b", method, **settings, devices=2, fsdp=True)
    assert two.details["weights.nf4_linears"] == -(-one.details["weights.nf4_linears"] // 2)
    assert two.buckets["optimizer"] < one.buckets["optimizer"]
    assert two.details["weights.fsdp_gathered_blocks"] > 0
    assert two.buckets["activations"] == one.buckets["activations"]
    assert 0.5 * one.total_bytes < two.total_bytes < 0.6 * one.total_bytes
    with pytest.raises(ValueError, match="devices must be an int >= 1"):
        plan_memory("llama-65b", method, **settings, devices=0, fsdp=True)
