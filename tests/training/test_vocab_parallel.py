"""The vocabulary-parallel embedding, head and loss (minituner.training.vocab_parallel), on 2
CPU processes (gloo) holding different numbers of tokens and an odd vocabulary: each gives what
one process computes with the whole matrix (loss, gradient, embeddings, logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = '''
import json, sys
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from minituner.training.distributed import init_distributed, shutdown_distributed
from minituner.training.losses import chunked_lm_loss
from minituner.training.vocab_parallel import (
    VocabShardedEmbedding, VocabShardedHead, row_range, vocab_parallel_nll,
    vocab_sharded_parameter)

def main(out):
    info = init_distributed(torch.device("cpu"))
    mesh = init_device_mesh("cpu", (info.world_size,))
    vocab, d = 37, 12  # 19 + 18 rows
    weight = torch.randn(vocab, d, generator=torch.Generator().manual_seed(0))
    sharded = vocab_sharded_parameter(weight, mesh)
    first, stop = row_range(sharded)
    result = {"rows": [first, stop], "local_rows": sharded.to_local().shape[0],
              "full_equal": bool(torch.equal(sharded.full_tensor(), weight))}

    generator = torch.Generator().manual_seed(10 + info.rank)
    n = 5 if info.rank == 0 else 9  # the processes hold different token counts
    hidden = torch.randn(1, n, d, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (1, n), generator=generator)
    targets[0, 1] = -100  # an ignored position
    targets[0, -1] = vocab - 1  # the last row of the last slice
    loss = vocab_parallel_nll(hidden, sharded, targets)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_hidden[0] @ weight.t(), targets[0], reduction="sum")
    reference.backward()
    result["loss_error"] = abs(loss.item() - reference.item())
    result["grad_error"] = float((hidden.grad - reference_hidden.grad).abs().max())
    chunked = hidden.detach().clone().requires_grad_()
    (2.0 * chunked_lm_loss(chunked, weight, targets, reduction="sum")).backward()
    hidden.grad = None
    (2.0 * vocab_parallel_nll(hidden, sharded, targets)).backward()  # the incoming grad scales
    result["scaled_grad_error"] = float((hidden.grad - chunked.grad).abs().max())
    with torch.no_grad():
        result["no_grad_loss_error"] = abs(float(vocab_parallel_nll(hidden, sharded, targets))
                                           - float(reference))

    ids = torch.randint(0, vocab, (2, 3 + info.rank), generator=generator)
    ids[0, 0] = vocab - 1
    embedded = VocabShardedEmbedding(sharded)(ids)
    result["embedding_equal"] = bool(torch.equal(embedded, F.embedding(ids, weight)))
    logits = VocabShardedHead(sharded)(hidden.detach())
    result["logits_error"] = float((logits - hidden.detach() @ weight.t()).abs().max())
    result["logits_shape"] = list(logits.shape)

    bf16 = vocab_sharded_parameter(weight.bfloat16(), mesh)
    low = hidden.detach().bfloat16().requires_grad_()
    vocab_parallel_nll(low, bf16, targets).backward()
    result["bf16_finite"] = bool(torch.isfinite(low.grad.float()).all())
    result["bf16_grad_dtype"] = str(low.grad.dtype)
    open(f"{out}.{info.rank}", "w").write(json.dumps(result))


main(sys.argv[1])  # its tensors and device mesh are gone before the group is left
shutdown_distributed()
'''


@pytest.mark.slow
def test_vocab_parallel_matches_one_process(tmp_path):
    script, out = tmp_path / "child.py", tmp_path / "result.json"
    script.write_text(CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.json.{rank}").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in ranks] == [[0, 19], [19, 37]]
    assert [r["local_rows"] for r in ranks] == [19, 18]
    for result in ranks:
        assert result["full_equal"] and result["embedding_equal"]
        assert result["loss_error"] < 1e-4 and result["no_grad_loss_error"] < 1e-4
        assert result["grad_error"] < 1e-5 and result["scaled_grad_error"] < 1e-5
        assert result["logits_error"] < 1e-5
        assert result["bf16_finite"] and result["bf16_grad_dtype"] == "torch.bfloat16"
    assert ranks[0]["logits_shape"] == [1, 5, 37] and ranks[1]["logits_shape"] == [1, 9, 37]
