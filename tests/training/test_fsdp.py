"""FSDP2 (--fsdp): 2 CPU processes under torchrun (gloo) shard a LoRA or QLoRA run and save the
adapter one process saves without FSDP (also with gradient checkpointing; bf16 trains); a
sharded run SIGKILLed after a checkpoint resumes on 1 and on 2 processes to the uninterrupted
run's adapter; the bad inputs are one line each."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hf_helpers import write_data
from test_distributed import adapter, max_diff, torchrun
from test_resume import wait_for_checkpoint

from minituner.cli import main
from minituner.training.distributed import DistInfo
from minituner.training.fsdp import check_fsdp_blocks, clip_gradients, full_tensors
from minituner.util.files import read_json


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
        assert read_json(one / "results.json")["base_params"] == \
            read_json(two / "results.json")["base_params"]
        assert max(float(t.abs().max()) for k, t in adapter(one).items()
                   if "lora_B" in k) > 1e-3  # the adapter moved


def process_tree(pid: int) -> list:
    """``pid`` and every process below it (read from /proc): torchrun starts each worker in a
    session of its own, so killing torchrun's process group would leave them running."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree = [pid]
    for member in tree:
        tree.extend(child for child, up in parent.items() if up == member)
    return tree


def torchrun_killed(args: list, out, step: int) -> None:
    """``torchrun`` 2 processes on ``args``; SIGKILL it and its workers at once when ``out``
    holds a checkpoint at ``step`` or later (no process gets to clean up)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "minituner"]
    child = subprocess.Popen(launcher + args, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(child, out, step, timeout=60)
        tree = process_tree(child.pid)
        assert len(tree) >= 3, tree  # torchrun and its 2 workers
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    time.sleep(0.5)  # the workers are gone: nothing more is written
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in
                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                   for pid in tree)


@pytest.mark.slow
def test_fsdp_run_killed_resumes_on_one_and_on_two_processes(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("gpt2")
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)
    steps = ["--steps", "8", "--grad-accum", "4", "--eval-every", "1000"]  # seconds past step 2
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun([*command(model_dir, data, whole, "qlora", *steps), "--fsdp"], processes=2)
    torchrun_killed([*command(model_dir, data, killed, "qlora", *steps), "--fsdp"], killed, 2)
    assert not (killed / "results.json").exists()
    for processes in (1, 2):
        out = tmp_path / f"resumed-{processes}"
        shutil.copytree(killed, out)
        args = [*command(model_dir, data, out, "qlora", *steps), "--resume"]
        if processes == 1:
            assert main(args) == 0
        else:
            torchrun([*args, "--fsdp"], processes=2)
        assert 2 <= read_json(out / "results.json")["resumed_from_step"] < 8
        assert max_diff(adapter(whole), adapter(out)) < 1e-6, processes


@pytest.mark.slow
def test_fsdp_grad_checkpointing_matches_and_bf16_trains(tmp_path, toy_hf_model):
    model_dir = toy_hf_model("llama")
    data = write_data(tmp_path / "data.jsonl", n=24, seed=5)
    plain, checkpointed, bf16 = tmp_path / "plain", tmp_path / "ckpt", tmp_path / "bf16"
    torchrun([*command(model_dir, data, plain, "qlora"), "--fsdp"], processes=2)
    torchrun([*command(model_dir, data, checkpointed, "qlora"), "--fsdp",
              "--grad-checkpointing"], processes=2)
    assert max_diff(adapter(plain), adapter(checkpointed)) < 1e-5
    torchrun([*command(model_dir, data, bf16, "qlora"), "--fsdp", "--dtype", "bf16"],
             processes=2)
    trained = adapter(bf16)
    assert trained.keys() == adapter(plain).keys()
    assert all(bool(torch.isfinite(t).all()) for t in trained.values())
    assert max(float(t.abs().max()) for k, t in trained.items() if "lora_B" in k) > 1e-3
    assert read_json(bf16 / "results.json")["compute_dtype"] == "bf16"


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
    # the embedding and head are split by vocabulary rows: only the final norm is gathered
    assert two.details["weights.fsdp_unsharded_root"] == 8192 * 2
    assert two.details["weights.frozen_other"] == -(-one.details["weights.frozen_other"] // 2)
    assert two.details["weights.fsdp_gather_buffers"] >= 0
    assert two.details["activations.saved_blocks"] == one.details["activations.saved_blocks"]
    # the loss is vocabulary-parallel: both devices' 512 tokens against this device's 16,000
    # vocabulary rows, bf16 logits and their fp32 copy (one device: 32,000 rows, bf16 logits
    # and two fp32 gradients)
    assert two.details["activations.logits_transient"] == 1024 * 16000 * (2 + 4)
    assert one.details["activations.logits_transient"] == 512 * 32000 * (2 + 8)
    assert 0.5 * one.total_bytes < two.total_bytes < 0.6 * one.total_bytes
    with pytest.raises(ValueError, match="devices must be an int >= 1"):
        plan_memory("llama-65b", method, **settings, devices=0, fsdp=True)


def test_planner_splits_a_frozen_vocabulary_over_the_devices():
    from minituner.training.memory import plan_memory

    settings = {"rank": 8, "seq": 64, "base_dtype": "fp32", "compute_dtype": "fp32",
                "chunked_loss": True}
    one = plan_memory("gpt2-small", "qlora", batch=4, **settings)
    two = plan_memory("gpt2-small", "qlora", batch=2, devices=2, fsdp=True, **settings)
    # gathered whole: the learned positions and the final LayerNorm, fp32
    assert two.details["weights.fsdp_unsharded_root"] == (1024 * 768 + 2 * 768) * 4
    # the loss: one chunk of this device's 25,129 vocabulary rows for both devices' 2 x 64
    # tokens, fp32 in place, beside the gathered hidden states and their gradient sums
    assert two.details["activations.logits_transient"] == 256 * 25129 * 4
    assert two.details["activations.vocab_parallel_gathers"] == 256 * (768 * 8 + 12)
    assert two.total_bytes < 0.5 * one.total_bytes


def test_planner_peak_is_the_largest_of_root_gather_activations_and_blocks():
    from minituner.training.memory import plan_memory

    # a module trained in full keeps the embedding and head in the root unit, gathered whole
    settings = {"rank": 8, "seq": 64, "base_dtype": "fp32", "chunked_loss": True,
                "trained_modules_params": 1}
    small = plan_memory("gpt2-small", "qlora", batch=1, devices=2, fsdp=True, **settings)
    root = small.details["weights.fsdp_unsharded_root"]
    assert root == (50257 * 768 + 1024 * 768 + 2 * 768) * 4
    # a short batch: the root's all-gather buffer (a second full root) sets the peak
    assert small.buckets["activations"] + small.details["weights.fsdp_gather_buffers"] == root
    large = plan_memory("gpt2-small", "qlora", batch=64, devices=2, fsdp=True, **settings)
    assert large.buckets["activations"] > root  # the activations set it
    assert large.details["weights.fsdp_gather_buffers"] < root
