"""Training: the optimizer builder, the warmup + cosine schedule, the one training loop
(:func:`fit`) and pretraining on it (:func:`pretrain`)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from minituner.models.minigpt import masked_token_nll
from minituner.training.checkpoint import capture_rng, restore_rng
from minituner.training.config import (
    KIND_DEFAULTS,
    LR_SCHEDULERS,
    FinetuneConfig,
    PretrainConfig,
)
from minituner.training.evaluation import call_model, make_validator
from minituner.training.fsdp import (
    clip_gradients,
    full_optimizer_state,
    full_tensors,
    is_sharded,
    load_full_tensors,
    load_optimizer_state,
    total_gradient_norm,
)
from minituner.training.sampling import SequenceBatches


def trainable_parameters(model: nn.Module) -> list:
    """(name, parameter) pairs that require gradients."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple = (0.9, 0.999),
    loraplus_lr_ratio: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; refuses a model with nothing to train.

    Rank-0 LoRA leaves zero trainable tensors. PyTorch's AdamW raises an opaque error on an
    empty parameter list, so we raise a clear one instead, and we never fall back to training
    the frozen base.

    LoRA+ (Hayou et al., 2024): ``loraplus_lr_ratio`` K gives every ``lora_B`` its own parameter
    group with learning rate K * lr (A and everything else keep lr; the schedule scales both).
    K = 1 builds exactly the groups of plain LoRA.
    """
    check_loraplus_ratio(loraplus_lr_ratio)
    named = trainable_parameters(model)
    if not named or sum(p.numel() for _, p in named) == 0:
        raise ValueError(
            "nothing is trainable: the model has no parameter with requires_grad=True "
            "(rank 0 adapts nothing; use r >= 1, or --method full to train the base)"
        )
    named = [(n, p) for n, p in named if p.numel() > 0]
    faster = [p for n, p in named if loraplus_lr_ratio != 1.0 and n.endswith("lora_B")]
    chosen = {id(p) for p in faster}
    decay = [p for n, p in named if p.ndim >= 2 and id(p) not in chosen]
    no_decay = [p for n, p in named if p.ndim < 2 and id(p) not in chosen]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if faster:
        groups.append({"params": faster, "weight_decay": weight_decay,
                       "lr": lr * loraplus_lr_ratio})
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def check_loraplus_ratio(ratio) -> float:
    """Validate LoRA+'s ratio of B's learning rate to A's: a finite number > 0."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
            0 < ratio < math.inf):
        raise ValueError(f"loraplus_lr_ratio must be a finite number > 0, got {ratio!r}")
    return float(ratio)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then linear decay to 0 (transformers' linear)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup, then constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def lr_multiplier(kind: str, step: int, total_steps: int, warmup_steps: int,
                  min_ratio: float = 0.1) -> float:
    """The multiplier of schedule ``kind`` ('cosine', 'linear' or 'constant') at ``step``."""
    if kind == "cosine":
        return warmup_cosine(step, total_steps, warmup_steps, min_ratio)
    if kind == "linear":
        return warmup_linear(step, total_steps, warmup_steps)
    if kind == "constant":
        return warmup_constant(step, warmup_steps)
    raise ValueError(f"--lr-scheduler must be one of {list(LR_SCHEDULERS)}, got {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.1,
    kind: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with schedule ``kind`` (default :func:`warmup_cosine`, down to ``min_ratio``)."""
    lr_multiplier(kind, 0, total_steps, warmup_steps, min_ratio)  # refuse an unknown kind now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(kind, step, total_steps, warmup_steps, min_ratio)
    )


def warmup_steps_of(cfg: FinetuneConfig, steps: int) -> int:
    """Warmup steps of a run: --warmup-steps when given, else --warmup-ratio of ``steps``."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, steps)
    return int(cfg.warmup * steps)


def total_steps(cfg: FinetuneConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: --steps (the model kind's default when unset), or --epochs over the
    training rows."""
    if cfg.epochs is None:
        return cfg.steps or KIND_DEFAULTS[cfg.kind]["steps"]
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; returns a generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the training loop


@dataclass
class LoopConfig:
    """Step counts of the generic training loop (data, model and loss live elsewhere)."""

    steps: int
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    eval_every: int = 25
    checkpoint_every: int = 50


class NonFiniteLossError(ValueError):
    """Training produced a NaN/inf loss or gradient; the message names the step."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the log, the best step and where the run resumed from."""

    log: list
    best_step: int | None
    best_metrics: dict
    resumed_from: int | None


def token_count(batch: dict) -> int:
    """Target tokens of a batch: the denominator of the loss."""
    return int(batch["target_mask"].sum())


def _snapshot(named: list) -> dict:
    return full_tensors(named)  # FSDP: gathered, so a checkpoint is the one-process format


def _restore(named: list, state: dict) -> None:
    load_full_tensors(named, state)  # FSDP: each process takes its shard


def fit(
    model: nn.Module,
    loss_fn: Callable,
    batches: Callable[[int], dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: LoopConfig,
    evaluate: Callable[[nn.Module], dict] | None = None,
    writer=None,
    on_step: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    reduce_count: Callable[[int], int] = int,
    restore_best: bool = True,
    reduce_loss: Callable[[float], float] = float,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps; model-agnostic and resumable.

    ``batches(k)`` gives micro-batch ``k`` (a dict with at least ``target_mask``);
    ``loss_fn(model, batch)`` returns (sum of token losses, token count). Each step divides the
    summed loss of its ``grad_accum`` micro-batches by their total token count (passed through
    ``reduce_count``, where a distributed run sums it over processes; ``reduce_loss`` does the
    same for the logged summed loss). ``evaluate(model)``
    returns metrics with ``val_loss``; the lowest keeps the best step. All files go through
    ``writer`` (a :class:`minituner.training.checkpoint.RunWriter`). ``resume`` is a loaded
    checkpoint.
    """
    named = trainable_parameters(model)
    log, best = [], {"step": None, "metrics": {}, "state": None}
    start = 0
    if resume is not None:
        _restore(named, resume["trainable"])
        load_optimizer_state(optimizer, resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        restore_rng(resume["rng"])
        start, log, best = int(resume["step"]), list(resume["log"]), dict(resume["best"])
    model.train()
    started, seen_tokens = time.perf_counter(), 0
    for step in range(start + 1, cfg.steps + 1):
        micro = [batches((step - 1) * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
        total_tokens = max(1, reduce_count(sum(token_count(b) for b in micro)))
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for batch in micro:
            loss_sum, _ = loss_fn(model, batch)
            (loss_sum / total_tokens).backward()
            loss_total += float(loss_sum.detach())
        loss = reduce_loss(loss_total) / total_tokens
        _check_finite("loss", loss, step, writer)
        if cfg.grad_clip:
            norm = clip_gradients([p for _, p in named], cfg.grad_clip)
            _check_finite("gradient norm", norm, step, writer)
        else:
            norm = gradient_norm(named)
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - started
        seen_tokens += total_tokens
        record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                  "target_tokens": total_tokens, "elapsed_s": elapsed, "grad_norm": norm,
                  "tokens_per_s": seen_tokens / max(elapsed, 1e-9)}
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics = evaluate(model)
            record.update(metrics)
            if best["step"] is None or metrics["val_loss"] < best["metrics"]["val_loss"]:
                best = {"step": step, "metrics": metrics, "state": _snapshot(named)}
        log.append(record)
        if on_step is not None:
            on_step(record)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _check_finite_weights(named, step, writer)
        if writer is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            writer.save_checkpoint({
                "step": step, "trainable": _snapshot(named),
                "optimizer": full_optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                "rng": capture_rng(), "log": log, "best": best,
            })
            writer.write_log(log)
    if restore_best and best["state"] is not None:
        _restore(named, best["state"])
    return FitResult(log, best["step"], best["metrics"], start if resume is not None else None)


@torch.no_grad()
def gradient_norm(named: list) -> float:
    """The L2 norm of every trainable gradient together (what clipping would measure)."""
    if any(is_sharded(p) for _, p in named):
        return float(total_gradient_norm([p for _, p in named]))
    norms = [torch.linalg.vector_norm(p.grad.float()) for _, p in named if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _check_finite(what: str, value: float, step: int, writer) -> None:
    if math.isfinite(value):
        return
    last = writer.latest() if writer is not None else None
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"training stopped: {what} is {value} at step {step}; {kept} "
        "(lower --lr or check the data)"
    )


@torch.no_grad()
def _check_finite_weights(named: list, step: int, writer) -> None:
    """Before a checkpoint and at the end: an update that overflowed the weights stops the run
    (a finite loss only vouches for the weights it was computed with)."""
    for name, param in full_tensors(named).items():  # FSDP: every process checks all
        if not bool(torch.isfinite(param).all()):
            _check_finite(f"trainable tensor {name}", math.nan, step, writer)


# ----------------------------------------------------------------------------- pretraining


def lm_loss(model: nn.Module, batch: dict) -> tuple:
    """(summed masked next-token NLL, target count) of a Mini-GPT style model: pretraining's
    ``loss_fn`` for :func:`fit` (whose sum / count is the model's own mean loss)."""
    return masked_token_nll(call_model(model, batch), batch["targets"], batch["target_mask"])


def pretrain(
    model: nn.Module,
    train_sequences: list,
    val_sequences: list,
    pad_id: int,
    cfg: PretrainConfig,
    on_step: Callable[[dict], None] | None = None,
    writer=None,
    resume: dict | None = None,
) -> FitResult:
    """Train ``model`` on next-token prediction with :func:`fit`; resumable.

    Batches follow :class:`minituner.training.sampling.SequenceBatches` (the seed's order),
    every ``eval_every`` steps the validation loss is logged and a checkpoint goes through
    ``writer``, and ``resume`` (a loaded checkpoint) continues a killed run. The model keeps
    the last step's weights (not the best step's): that is the base.
    """
    cfg.validate()
    seed_everything(cfg.seed)
    batches = SequenceBatches(train_sequences, cfg.batch_size, cfg.seed, pad_id)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps)
    loop = LoopConfig(steps=cfg.steps, grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
                      checkpoint_every=cfg.eval_every)
    evaluate = make_validator(val_sequences, pad_id, batch_size=64)
    return fit(model, lm_loss, batches, optimizer, scheduler, loop, evaluate=evaluate,
               writer=writer, on_step=on_step, resume=resume, restore_best=False)
