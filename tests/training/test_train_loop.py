"""The generic fine-tuning loop: token-count normalisation, NaN stop, best step, samplers,
checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from minituner.models.minigpt import MiniGPT, MiniGPTConfig, masked_token_nll
from minituner.training.checkpoint import RunWriter, checkpoint_steps, load_checkpoint
from minituner.training.loop import (
    LoopConfig,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    fit,
)
from minituner.training.sampling import EpochSampler

SMALL = MiniGPTConfig(vocab_size=16, context_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=32)


def nll_loss(model, batch):
    return masked_token_nll(model(batch["input_ids"]), batch["targets"], batch["target_mask"])


def make_batch(seed: int, rows: int = 4, width: int = 6) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 16, (rows, width + 1), generator=generator)
    mask = torch.rand(rows, width, generator=generator) > 0.3
    mask[:, -1] = True
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "target_mask": mask}


def fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = MiniGPT(SMALL)
    optimizer = build_optimizer(model, lr=1e-2)
    return model, optimizer, build_scheduler(optimizer, 10, 0)


def test_grad_accumulation_divides_by_the_total_token_count():
    full = make_batch(1, rows=6)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    assert int(halves[0]["target_mask"].sum()) != int(halves[1]["target_mask"].sum())
    one, opt1, sched1 = fresh()
    fit(one, nll_loss, lambda k: full, opt1, sched1, LoopConfig(steps=2, grad_clip=None))
    two, opt2, sched2 = fresh()
    fit(two, nll_loss, lambda k: halves[k % 2], opt2, sched2,
        LoopConfig(steps=2, grad_accum=2, grad_clip=None))
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    model, optimizer, scheduler = fresh()

    def loss_fn(model, batch):
        total, count = nll_loss(model, batch)
        return (total * float("nan") if loss_fn.calls == 3 else total), count

    def counting(model, batch):
        loss_fn.calls += 1
        return loss_fn(model, batch)

    loss_fn.calls = 0
    writer = RunWriter(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; the last good "
                                                 r"checkpoint .*step-000002\.pt is kept"):
        fit(model, counting, lambda k: make_batch(k), optimizer, scheduler,
            LoopConfig(steps=10, checkpoint_every=2), writer=writer)
    assert [step for step, _ in checkpoint_steps(tmp_path)] == [2]
    saved = load_checkpoint(checkpoint_steps(tmp_path)[0][1])
    for name, param in model.named_parameters():  # step 3 never updated the weights
        assert torch.equal(saved["trainable"][name], param.detach()), name


def test_best_step_is_restored_and_checkpoints_rotate(tmp_path):
    model, optimizer, scheduler = fresh()
    val = iter([3.0, 1.0, 2.0, 2.5])
    snapshots = {}

    def evaluate(model):
        step = len(snapshots) + 1
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {"val_loss": next(val)}

    result = fit(model, nll_loss, lambda k: make_batch(k), optimizer, scheduler,
                 LoopConfig(steps=8, eval_every=2, checkpoint_every=2), evaluate=evaluate,
                 writer=RunWriter(tmp_path, keep=2))
    assert result.best_step == 4 and result.best_metrics == {"val_loss": 1.0}
    for name, param in model.named_parameters():
        assert torch.equal(param, snapshots[2][name]), name
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [6, 8]
    assert len(result.log) == 8 and all(math.isfinite(r["loss"]) for r in result.log)
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 8


def test_resume_from_a_checkpoint_matches_an_uninterrupted_fit(tmp_path):
    whole, opt, sched = fresh()
    fit(whole, nll_loss, lambda k: make_batch(k), opt, sched, LoopConfig(steps=6))
    first, opt, sched = fresh()
    fit(first, nll_loss, lambda k: make_batch(k), opt, sched,
        LoopConfig(steps=6, checkpoint_every=3), writer=RunWriter(tmp_path))
    state = load_checkpoint(tmp_path / "checkpoints" / "step-000003.pt")
    again, opt, sched = fresh(seed=123)  # different init: everything comes from the checkpoint
    result = fit(again, nll_loss, lambda k: make_batch(k), opt, sched, LoopConfig(steps=6),
                 resume=state)
    assert result.resumed_from == 3 and len(result.log) == 6
    for (name, a), (_, b) in zip(whole.named_parameters(), again.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7), name


def test_reduce_count_is_the_divisor():
    batch = make_batch(2)

    def sgd_step(reduce_count) -> list:
        torch.manual_seed(0)
        model = MiniGPT(SMALL)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        fit(model, nll_loss, lambda k: batch, optimizer, scheduler,
            LoopConfig(steps=1, grad_clip=None), reduce_count=reduce_count)
        return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]

    plain, doubled = sgd_step(int), sgd_step(lambda n: 2 * n)
    assert any(float(d.abs().max()) > 0 for d in plain)
    for full, half in zip(plain, doubled, strict=True):
        assert torch.allclose(full, 2 * half, rtol=1e-3, atol=2e-7)  # fp32 rounding at 1.0


def test_epoch_sampler_is_a_pure_function_of_the_step():
    sampler = EpochSampler(10, 3, seed=7)
    assert sampler.batches_per_epoch == 3
    epoch0 = [i for step in range(3) for i in sampler.indices(step)]
    assert len(set(epoch0)) == 9
    assert EpochSampler(10, 3, seed=7).indices(4) == sampler.indices(4)
    assert sampler.indices(3) != sampler.indices(0) or sampler.indices(4) != sampler.indices(1)
    ranks = [EpochSampler(12, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    rows = [i for r in ranks for i in r.indices(5)]
    assert len(rows) == len(set(rows)) == 6
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochSampler(3, 4, seed=0)
