"""LoRA+: B's parameter group learns K times faster; K = 1 is plain LoRA to the byte."""

from __future__ import annotations

import pytest
import torch

from minituner.lora import wrap_minigpt_with_lora
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.training.config import FinetuneConfig
from minituner.training.loop import build_optimizer, build_scheduler


def adapted(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return wrap_minigpt_with_lora(MiniGPT(MiniGPTConfig()), r=4, seed=1)


def train(ratio: float | None, steps: int = 3) -> dict:
    model = adapted()
    kwargs = {} if ratio is None else {"loraplus_lr_ratio": ratio}
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01, **kwargs)
    scheduler = build_scheduler(optimizer, steps, 1)
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).logsumexp(-1).mean().backward()
        optimizer.step()
        scheduler.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ratio_one_gives_plain_lora_bytes():
    plain, one = train(None), train(1.0)
    assert all(torch.equal(plain[name], one[name]) for name in plain)


def test_b_gets_its_own_group_at_k_times_the_rate():
    model = adapted()
    optimizer = build_optimizer(model, lr=2e-3, loraplus_lr_ratio=16)
    groups = optimizer.param_groups
    b_ids = {id(p) for n, p in model.named_parameters() if n.endswith("lora_B")}
    fast = [g for g in groups if g["lr"] == pytest.approx(2e-3 * 16)]
    assert len(fast) == 1 and {id(p) for p in fast[0]["params"]} == b_ids
    assert all(g["lr"] == pytest.approx(2e-3) for g in groups if g is not fast[0])
    scheduler = build_scheduler(optimizer, 10, 2)
    scheduler.step()
    rates = sorted(g["lr"] for g in optimizer.param_groups)
    assert rates[-1] == pytest.approx(16 * rates[0])  # the schedule scales both


def test_ratio_changes_training_and_moves_b_further():
    plain, fast = train(None), train(16.0)
    start = {n: p.detach() for n, p in adapted().named_parameters() if p.requires_grad}
    name = next(n for n in plain if n.endswith("lora_B"))
    assert (fast[name] - start[name]).norm() > 2 * (plain[name] - start[name]).norm()
    a_name = next(n for n in plain if n.endswith("lora_A"))
    assert not torch.equal(fast[a_name], plain[a_name])  # A sees a different B's gradient


@pytest.mark.parametrize("ratio", [0, -1, float("inf"), float("nan"), True, "16"])
def test_bad_ratios_are_refused(ratio):
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        build_optimizer(adapted(), loraplus_lr_ratio=ratio)


def test_config_checks_the_ratio_and_the_method():
    FinetuneConfig(loraplus_lr_ratio=16.0).validate()
    with pytest.raises(ValueError, match="--loraplus-lr-ratio must be a positive finite"):
        FinetuneConfig(loraplus_lr_ratio=0.0).validate()
    assert FinetuneConfig().loraplus_lr_ratio is None  # old configs: plain LoRA
