"""masked_nll_sum: the shared eval loop sums masked NLL, restores the mode, takes any forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from minituner.training.evaluation import masked_nll_sum, perplexity


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

    def forward(ids):
        seen.append(model.training)
        return model(ids)

    assert masked_nll_sum(forward, batches(), module=model)[1] > 0
    assert seen == [False, False] and model.training

    def failing(ids):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        masked_nll_sum(failing, batches(), module=model)
    assert model.training
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(0.0, 0.0)
