"""Data parallelism: 2 CPU processes under torchrun (gloo) compute what 1 process computes, and a
run checkpointed by 2 processes resumes in 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_helpers import write_data
from safetensors.torch import load_file

from minituner.cli import main
from minituner.training.distributed import DistInfo, all_reduce_sum, init_distributed, reduce_count


def finetune_command(model_dir, data, out, *extra) -> list:
    return ["finetune", "--model", f"hf:{model_dir}", "--data", str(data),
            "--val-fraction", "0.25", "--steps", "4", "--batch-size", "4", "--lr", "0.01",
            "--eval-every", "2", "--checkpoint-every", "2", "--warmup", "0", "--rank", "4",
            "--device", "cpu", "--out", str(out), *extra]


def torchrun(args: list, processes: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m minituner ARGS`` on CPU (gloo)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", "-m", "minituner"]
    done = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(out) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_single_process_helpers_are_identities():
    assert init_distributed(torch.device("cpu")) == DistInfo()
    assert reduce_count(7) == 7
    assert torch.equal(all_reduce_sum(torch.tensor([1.5, 2.0])), torch.tensor([1.5, 2.0]))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)  # 18 train rows: uneven lengths
    assert main(finetune_command(model_dir, data, tmp_path / "one")) == 0  # this process
    two = torchrun(finetune_command(model_dir, data, tmp_path / "two"), processes=2)
    assert "processes 2" in two.stdout
    assert two.stdout.count("processes 2,") == 1  # rank 0 alone prints
    difference = max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    assert difference < 1e-5
    assert max(float(t.abs().max()) for k, t in adapter(tmp_path / "one").items()
               if "lora_B" in k) > 1e-3  # the adapter moved: the comparison means something
    logs = [[json.loads(line) for line in (tmp_path / name / "train_log.jsonl").open()]
            for name in ("one", "two")]
    for a, b in zip(*logs, strict=True):  # same global loss, token count and validation loss
        assert a["target_tokens"] == b["target_tokens"]
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2
    # the 2-process run "dies" after its step-2 checkpoint; one process finishes it
    (tmp_path / "two" / "checkpoints" / "step-000004.pt").unlink()
    (tmp_path / "two" / "results.json").unlink()  # it never finished
    assert main(finetune_command(model_dir, data, tmp_path / "two", "--resume")) == 0
    resumed = json.loads((tmp_path / "two" / "results.json").read_text())
    assert resumed["resumed_from_step"] == 2 and resumed["world_size"] == 1
    assert max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two")) < 1e-5


def test_dropout_seed_is_a_function_of_the_step_and_differs_between_processes():
    from minituner.hf.finetune import dropout_seed

    seeds = {dropout_seed(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and dropout_seed(3, 7, 1) == dropout_seed(3, 7, 1)
    assert dropout_seed(0, 7, 1) != dropout_seed(1, 7, 1)


@pytest.mark.slow
def test_two_processes_with_dropout_resume_to_the_same_bytes(tmp_path, toy_hf_model):
    # the processes see rows of different lengths, so their RNGs would drift apart: resuming
    # both from rank 0's saved RNG state would change rank 1's dropout masks
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)
    command = finetune_command(model_dir, data, tmp_path / "two", "--dropout", "0.3")
    torchrun(command, processes=2)
    whole = (tmp_path / "two" / "adapter" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "two" / "checkpoints" / "step-000004.pt").unlink()  # died after step 2
    torchrun([*command, "--resume"], processes=2)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").read_bytes() == whole
