"""The generic training loop: token-count normalisation, NaN stop, best step, samplers,
checkpoints, and pretraining on it (the same bytes as the loop it replaced)."""

from __future__ import annotations

import math

import pytest
import torch

from minituner.models.minigpt import MiniGPT, MiniGPTConfig, masked_token_nll
from minituner.training.checkpoint import RunWriter, checkpoint_steps, load_checkpoint
from minituner.training.config import PretrainConfig
from minituner.training.evaluation import evaluate_loss
from minituner.training.loop import (
    LoopConfig,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    fit,
    lm_loss,
    pretrain,
    seed_everything,
)
from minituner.training.sampling import EpochSampler, SequenceBatches, StreamEpochSampler, collate

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


# ----------------------------------------------------------------------------- pretraining


def old_batch_order(n_items: int, batch_size: int, seed: int, count: int) -> list:
    """The order pretraining used before it ran on fit: one seeded generator, one randperm per
    epoch, the remainder of each epoch dropped."""
    generator, batches = torch.Generator().manual_seed(seed), []
    while len(batches) < count:
        order = torch.randperm(n_items, generator=generator).tolist()
        for start in range(0, n_items - batch_size + 1, batch_size):
            batches.append(order[start : start + batch_size])
    return batches[:count]


def old_pretrain(model, train, val, pad_id, cfg) -> list:
    """The pretraining loop as it was before it ran on fit (the reference for the bytes)."""
    generator = seed_everything(cfg.seed)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps)
    order = old_batch_order(len(train), cfg.batch_size, cfg.seed, cfg.steps)
    assert generator.initial_seed() == cfg.seed
    val_losses = []
    model.train()
    for step, rows in enumerate(order, start=1):
        batch = collate([train[i] for i in rows], pad_id)
        _, loss = model(batch["input_ids"], batch["targets"], batch["target_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_losses.append(evaluate_loss(model, val, pad_id))
    return val_losses


def random_sequences(count: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
    return [torch.randint(1, 16, (n,), generator=generator).tolist() for n in lengths]


def test_stream_sampler_reproduces_the_seeded_generator_order():
    sampler = StreamEpochSampler(11, 3, seed=5)
    assert sampler.batches_per_epoch == 3  # 11 // 3: two rows of each epoch are dropped
    old = old_batch_order(11, 3, 5, 14)
    assert [sampler.indices(k) for k in range(14)] == old
    assert old[3] != old[0] or old[4] != old[1]  # epochs differ
    # Stateless: any step in any order, as a resumed run asks for them.
    assert [sampler.indices(k) for k in (13, 2, 9, 0, 13)] == [old[k] for k in (13, 2, 9, 0, 13)]
    assert StreamEpochSampler(11, 3, seed=5).indices(10) == old[10]


def test_lm_loss_sum_over_count_is_the_models_mean_bit_for_bit():
    torch.manual_seed(0)
    model, batch = MiniGPT(SMALL), make_batch(3)
    _, mean = model(batch["input_ids"], batch["targets"], batch["target_mask"])
    mean.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    total, count = lm_loss(model, batch)
    assert int(count) == int(batch["target_mask"].sum())
    divided = total / max(1, int(count))  # what fit does with one micro-batch
    assert torch.equal(divided, mean)
    divided.backward()
    for a, b in zip(expected, (p.grad for p in model.parameters()), strict=True):
        assert torch.equal(a, b)


def test_pretrain_on_fit_gives_the_old_loops_bytes():
    train, val = random_sequences(30, 1), random_sequences(9, 2)
    cfg = PretrainConfig(steps=24, batch_size=4, lr=3e-3, warmup_steps=3, eval_every=5, seed=4)
    old = MiniGPT(SMALL)  # the init does not matter: both start from the same weights
    new = MiniGPT(SMALL)
    new.load_state_dict(old.state_dict())
    val_losses = old_pretrain(old, train, val, 0, cfg)
    result = pretrain(new, train, val, 0, cfg)
    assert len(result.log) == cfg.steps and result.best_step is not None
    assert [r["val_loss"] for r in result.log if "val_loss" in r] == val_losses
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_pretrain_resumes_from_a_checkpoint_to_the_same_bytes(tmp_path):
    train, val = random_sequences(30, 1), random_sequences(9, 2)
    cfg = PretrainConfig(steps=20, batch_size=4, warmup_steps=3, eval_every=5, seed=4)
    torch.manual_seed(0)
    whole = MiniGPT(SMALL)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    pretrain(whole, train, val, 0, cfg, writer=RunWriter(tmp_path, keep=10))
    assert [s for s, _ in checkpoint_steps(tmp_path)] == [5, 10, 15, 20]
    torch.manual_seed(99)  # another init: everything comes from the checkpoint
    again = MiniGPT(SMALL)
    state = load_checkpoint(tmp_path / "checkpoints" / "step-000010.pt")
    result = pretrain(again, train, val, 0, cfg, resume=state)
    assert result.resumed_from == 10 and [r["step"] for r in result.log] == list(range(1, 21))
    for (name, a), (_, b) in zip(whole.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(start[k], v) for k, v in again.state_dict().items())


def test_sequence_batches_collate_the_sampled_rows():
    sequences = random_sequences(10, 0)
    batches = SequenceBatches(sequences, 3, seed=2, pad_id=0)
    rows = batches.sampler.indices(4)
    assert torch.equal(batches(4)["input_ids"],
                       collate([sequences[i] for i in rows], 0)["input_ids"])
    with pytest.raises(ValueError, match="cannot fill one batch"):
        SequenceBatches(sequences[:2], 3, seed=2, pad_id=0)
