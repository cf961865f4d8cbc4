"""Shard-wise loading under --fsdp (minituner.hf.fsdp.load_sharded_base): 2 CPU processes
(gloo) each keep half of every layer, and the gathered base is byte for byte the one a single
process loads: NF4 codes and scales, float tensors, buffers (GPT-2's attention mask, Llama's
rotary table), the tied head, the fingerprint and tensor statistics, and LoRA's A; the
embedding and head are split by vocabulary rows (read a block of rows at a time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minituner.hf.fsdp import load_sharded_base
from minituner.hf.load import base_record
from minituner.quant.nf4_io import QUANT_STATE_KEY
from minituner.training.distributed import DistInfo

CHILD = '''
import json, sys
import torch
from minituner.hf.fsdp import NF4_SHARDED, load_sharded_base
from minituner.hf.load import base_record, load_base
from minituner.hf.models import apply_hf_lora
from minituner.lora.adapters import base_fingerprint, base_tensor_stats
from minituner.quant.qlora import QuantizedLinear
from minituner.training.distributed import init_distributed, shutdown_distributed
from minituner.training.fsdp import is_sharded

model_dir, method, out = sys.argv[1:4]
import minituner.hf.fsdp as hf_fsdp
hf_fsdp.STREAMED_BLOCK_ELEMENTS = 1000  # the embedding is read in many blocks of rows
info = init_distributed(torch.device("cpu"))
record = base_record(model_dir, method, torch.float32)

def add_adapters(model):
    apply_hf_lora(model, r=4, alpha=8.0, init="kaiming", seed=3)
    return model.train()

loaded = load_sharded_base(record, info, torch.device("cpu"), add_adapters)
one = load_base(record)
stats = base_tensor_stats(one)
fingerprint = base_fingerprint(one)
add_adapters(one)
full = lambda t: t.full_tensor() if is_sharded(t) else t
sharded = dict(loaded.model.named_parameters(remove_duplicate=False))
compared, halves, wrong = 0, 0, []
for name, module in one.named_modules():
    if isinstance(module, QuantizedLinear):
        for leaf in NF4_SHARDED:
            if getattr(module, leaf) is None:
                continue
            param = sharded[f"{name}.{leaf}"]
            halves += param.to_local().numel() <= -(-param.numel() // 2)
            compared += 1
            if not torch.equal(full(param), getattr(module, leaf)):
                wrong.append(f"{name}.{leaf}")
for name, tensor in one.named_parameters(remove_duplicate=False):
    compared += 1
    if not torch.equal(full(sharded[name].detach()), tensor.detach()):
        wrong.append(name)
sharded_buffers = dict(loaded.model.named_buffers())
for name, tensor in one.named_buffers():
    if name.rpartition(".")[2] in NF4_SHARDED:  # parameters under FSDP: compared above
        continue
    compared += 1
    if not torch.equal(sharded_buffers[name], tensor):
        wrong.append(name)
layer = next(m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)) \\
    if method == "qlora" else None
reference = next(m for m in one.modules() if isinstance(m, QuantizedLinear)) \\
    if method == "qlora" else None
result = {"compared": compared, "wrong": wrong, "halves": halves,
          "fingerprint": loaded.fingerprint == fingerprint, "stats": loaded.tensor_stats == stats,
          "offset": layer is None or layer.offset == reference.offset,
          "split": type(loaded.model.get_input_embeddings()).__name__ == "VocabShardedEmbedding"
          and type(loaded.model.get_output_embeddings()).__name__ == "VocabShardedHead",
          "rows": loaded.model.get_input_embeddings().weight.to_local().shape[0],
          "vocab": one.config.vocab_size,
          "tied": (loaded.model.get_output_embeddings().weight
                   is loaded.model.get_input_embeddings().weight)
          == (one.get_output_embeddings().weight is one.get_input_embeddings().weight)}
if info.rank == 0:
    open(out, "w").write(json.dumps(result))
shutdown_distributed()  # a barrier first: no rank tears gloo down under another
'''


@pytest.mark.slow
@pytest.mark.parametrize("arch,method", [("gpt2", "qlora"), ("llama", "qlora"), ("llama", "lora")])
def test_sharded_load_gathers_to_the_one_process_base(tmp_path, toy_hf_model, arch, method):
    script, out = tmp_path / "child.py", tmp_path / "result.json"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(toy_hf_model(arch)), method,
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["wrong"] == [] and result["compared"] > 20
    assert result["fingerprint"] and result["stats"] and result["offset"] and result["tied"]
    # the embedding and head are split by vocabulary rows, never held whole (rank 0's part)
    assert result["split"] and result["rows"] == -(-result["vocab"] // 2)
    if method == "qlora":
        assert result["halves"] > 0


def test_sharded_load_refuses_a_bitsandbytes_checkpoint(tmp_path, toy_hf_model):
    model_dir = tmp_path / "model"
    shutil.copytree(toy_hf_model("gpt2"), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors[f"transformer.h.0.attn.c_attn.weight.{QUANT_STATE_KEY}"] = torch.zeros(4,
                                                                                   dtype=torch.uint8)
    save_file(tensors, model_dir / "model.safetensors")
    record = base_record(model_dir, "qlora", torch.float32)
    with pytest.raises(ValueError, match="--fsdp loads float checkpoints only"):
        load_sharded_base(record, DistInfo(), torch.device("cpu"), lambda model: model)
