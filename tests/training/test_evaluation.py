"""masked_nll_sum: the shared eval loop sums masked NLL, restores the mode, takes any forward;
make_validator and summed_nll run it over encoded sequences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from minituner.training.evaluation import make_validator, masked_nll_sum, perplexity, summed_nll
from minituner.training.sampling import collate


def batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for rows in (2, 3):
        ids = torch.randint(0, 11, (rows, 5), generator=generator)
        mask = torch.rand(rows, 5, generator=generator) > 0.4
        out.append({"input_ids": ids, "targets": torch.roll(ids, -1, 1), "target_mask": mask})
    return out


def test_sum_and_count_match_a_manual_computation():
    model = nn.Sequential(nn.Embedding(11, 7), nn.Dropout(0.5), nn.Linear(7, 11)).train()
    total, count = masked_nll_sum(model, batches())
    assert model.training  # mode given back
    model.eval()
    expected, n = 0.0, 0
    for batch in batches():
        logp = torch.log_softmax(model(batch["input_ids"]).detach(), dim=-1)
        picked = logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        expected -= float(picked[batch["target_mask"]].sum())
        n += int(batch["target_mask"].sum())
    assert count == n and total == pytest.approx(expected, rel=1e-5)  # dropout was off
    assert perplexity(total, count) == pytest.approx(math.exp(expected / n), rel=1e-5)


def test_a_plain_callable_and_a_failing_forward():
    model = nn.Sequential(nn.Embedding(11, 7), nn.Linear(7, 11)).train()
    seen = []

    def forward(module, batch):
        seen.append(module.training)
        return module(batch["input_ids"])

    assert masked_nll_sum(model, batches(), forward)[1] > 0
    assert seen == [False, False] and model.training

    def failing(module, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        masked_nll_sum(model, batches(), failing)
    assert model.training
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(0.0, 0.0)


def test_validator_is_the_per_token_mean_over_all_batches():
    model = nn.Sequential(nn.Embedding(11, 7), nn.Linear(7, 11))
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 11, (n,), generator=generator).tolist() for n in (3, 6, 4, 9, 2)]
    total, count = summed_nll(model, sequences, pad_id=0, batch_size=2)
    assert count == sum(len(s) - 1 for s in sequences)
    whole = masked_nll_sum(model, [collate(sequences, 0)])
    assert total == pytest.approx(whole[0], rel=1e-6) and count == whole[1]
    metrics = make_validator(sequences, 0, batch_size=2)(model)
    assert metrics["val_loss"] == pytest.approx(total / count)
    assert metrics["val_ppl"] == pytest.approx(math.exp(total / count))
