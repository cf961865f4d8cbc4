"""Sample packing: packed rows keep examples apart (same loss and gradients as one by one),
packing is deterministic first-fit decreasing, and models whose attention cannot keep examples
apart are refused by name."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from minituner.hf.finetune import make_hf_loss_fn
from minituner.hf.models import load_hf_model
from minituner.hf.packing import check_packing_config, packed_inputs
from minituner.hf.toy import TOY_ARCHITECTURES
from minituner.training.packing import (
    PAD_SEGMENT,
    block_causal_mask,
    collate_packed,
    pack_lengths,
    pack_sequences,
    padding_stats,
)
from minituner.training.sampling import collate


def examples(n: int = 5, seed: int = 0) -> list:
    """Sequences of different lengths, with a prompt part that carries no loss."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 14)
        ids = [rng.randrange(7, 512) for _ in range(length)]
        prompt = rng.randint(0, length - 2)
        out.append({"ids": ids, "mask": [i >= prompt for i in range(length - 1)]})
    return out


def per_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           reduction="none").view(targets.shape)


def alone(model, sequence: dict) -> torch.Tensor:
    """Summed masked NLL of one example run by itself."""
    batch = collate([sequence], pad_id=0)
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return (per_token_nll(logits, batch["targets"]) * batch["target_mask"]).sum()


def grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_batch_gives_each_example_its_own_loss_and_gradients(toy_hf_model, arch,
                                                                     attention):
    model = load_hf_model(f"hf:{toy_hf_model(arch)}", dtype=torch.float32)
    model.config._attn_implementation = attention
    model.train()
    sequences = examples(6)
    rows = pack_sequences(sequences, capacity=30)
    assert len(rows) < len(sequences)  # some rows really hold several examples
    batch = collate(rows, pad_id=0)
    inputs = packed_inputs(batch, torch.float32, torch.device("cpu"))
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    nll = per_token_nll(logits, batch["targets"]) * batch["target_mask"]
    packed_losses = {}
    for row, pack in enumerate(rows):
        for segment, sequence in enumerate(pack["pack"]):
            in_segment = batch["segment_ids"][row] == segment
            packed_losses[id(sequence)] = nll[row][in_segment].sum()
    sum(packed_losses.values()).backward()
    packed_grads = grads(model)
    model.zero_grad(set_to_none=True)
    one_by_one = [alone(model, s) for s in sequences]
    sum(one_by_one).backward()
    for sequence, loss in zip(sequences, one_by_one, strict=True):
        torch.testing.assert_close(packed_losses[id(sequence)], loss, rtol=0, atol=1e-5)
    separate_grads = grads(model)
    assert separate_grads.keys() == packed_grads.keys()
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", TOY_ARCHITECTURES)
def test_training_loss_of_a_packed_batch_equals_the_unpacked_one(toy_hf_model, arch):
    """The loss the fine-tuning loop runs (chunked head) on packed rows and on padded rows."""
    model = load_hf_model(f"hf:{toy_hf_model(arch)}", dtype=torch.float32).train()
    loss_fn = make_hf_loss_fn(model, torch.device("cpu"))
    sequences = examples(7, seed=3)
    packed_sum, packed_count = loss_fn(model, collate(pack_sequences(sequences, 32), 0))
    padded_sum, padded_count = loss_fn(model, collate(sequences, 0))
    assert int(packed_count) == int(padded_count)
    torch.testing.assert_close(packed_sum, padded_sum, rtol=0, atol=1e-4)


def test_first_fit_decreasing_is_deterministic_and_fills_rows():
    assert pack_lengths([5, 9, 3, 7, 1, 4], 10) == [[1, 4], [3, 2], [0, 5]]
    lengths = [random.Random(1).randint(1, 40) for _ in range(200)]
    rows = pack_lengths(lengths, 64)
    assert rows == pack_lengths(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 64) + 2  # FFD stays close to the bound


def test_packing_refuses_an_example_longer_than_the_row():
    with pytest.raises(ValueError, match="more than the packed row's 4"):
        pack_lengths([3, 5], 4)


def test_collate_packed_positions_segments_and_loss_mask():
    a = {"ids": [10, 11, 12, 13], "mask": [False, True, True]}
    b = {"ids": [20, 21], "mask": [True]}
    batch = collate_packed([{"pack": [a, b]}, {"pack": [b]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20], [20, 0, 0, 0]]
    assert batch["targets"].tolist() == [[11, 12, 13, 21], [21, 0, 0, 0]]
    assert batch["target_mask"].tolist() == [[False, True, True, True],
                                             [True, False, False, False]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1], [0, PAD_SEGMENT, PAD_SEGMENT,
                                                            PAD_SEGMENT]]
    allowed = block_causal_mask(batch["segment_ids"])[0, 0] == 0
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, True, True, False], [False, False, False, True]]


def test_padding_stats():
    stats = padding_stats([(4, [4, 2]), (3, [3])])
    assert stats == {"tokens": 9, "slots": 11, "padding_fraction": pytest.approx(2 / 11)}


class Config:
    model_type = "mistral"
    _attn_implementation = "sdpa"
    sliding_window = 8


def test_attention_that_cannot_isolate_examples_is_refused_by_name():
    with pytest.raises(ValueError, match="'mistral' has a sliding attention window of 8"):
        check_packing_config(Config(), row_tokens=16)
    check_packing_config(Config(), row_tokens=8)
    flash = Config()
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        check_packing_config(flash, row_tokens=4)
