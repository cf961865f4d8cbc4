"""Fine-tuning a transformers causal LM on the user's JSONL with LoRA or QLoRA.

It runs the Mini-GPT fine-tuning machinery: :func:`minituner.training.loop.fit` (steps, gradient
accumulation, clipping, evaluation, best step, checkpoints and resume), the stateless
:class:`minituner.training.sampling.MixedBatches` sampler and
:class:`minituner.training.checkpoint.RunWriter`.
What is added here: the transformers model and its batches, devices and dtypes, gradient
checkpointing, and data parallelism (``torchrun``; see :mod:`minituner.training.distributed`).

Batch size is GLOBAL: ``batch_size`` rows per micro-step over all processes, split evenly, so
a run resumes on another process count and N processes compute what one process computes.
The run folder holds config.json, manifest.json, results.json, train_log.jsonl, loss.png,
data/ (the exact train/validation records), checkpoints/ and adapter/ (PEFT layout).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from minituner.hf.models import resolve_device, resolve_dtype
from minituner.models.minigpt import masked_token_nll
from minituner.training import distributed as D
from minituner.training.losses import masked_lm_nll, plain_output_head

HF_METHODS = ("lora", "qlora")
_KINDS = {"int": (int, "an integer"), "float": ((int, float), "a number"),
          "bool": (bool, "true or false")}  # field type -> (accepted types, wording)


@dataclass
class HFFinetuneConfig:
    """Every setting of a transformers fine-tuning run (flags, a --config file, or code)."""

    model: str = ""
    data: str = ""
    val_data: str | None = None
    val_fraction: float | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    use_rslora: bool = False
    steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0
    max_len: int | None = None
    strict_len: bool = False
    chat_template: bool = False
    grad_checkpointing: bool = False
    dtype: str = "auto"
    quant_scheme: str = "nf4_per_group_64"

    def validate(self) -> HFFinetuneConfig:
        """Raise a one-line ValueError naming the first bad setting; returns self."""
        self._check_types()
        if self.method not in HF_METHODS:
            raise ValueError(f"--method must be one of {list(HF_METHODS)} for transformers "
                             f"models, got {self.method!r}")
        positive = ("rank", "batch_size", "grad_accum", "eval_every", "checkpoint_every")
        if self.epochs is None or self.steps is not None:
            positive += ("steps",)
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, "
                                 f"got {getattr(self, name)!r}")
        if not (self.alpha > 0 and self.lr > 0 and 0 <= self.warmup < 1):
            raise ValueError("--alpha and --lr must be positive and --warmup in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.val_data and self.val_fraction:
            raise ValueError("give --val-data or --val-fraction, not both")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"--max-len must be a positive int, got {self.max_len}")
        return self

    def _check_types(self) -> None:
        """Numbers and flags (int, float, bool) of the wrong type, named before any comparison.

        A bool is not a number; an int is accepted where a float is expected.
        """
        for spec in fields(self):
            kinds = [part.strip() for part in str(spec.type).split("|")]
            value = getattr(self, spec.name)
            if kinds[0] not in _KINDS or (value is None and "None" in kinds):
                continue
            allowed, what = _KINDS[kinds[0]]
            if isinstance(value, bool) != (kinds[0] == "bool") or not isinstance(value, allowed):
                what += " or null" if "None" in kinds else ""
                raise ValueError(f"{spec.name} must be {what}, got {value!r}")

    def to_dict(self) -> dict:
        """Plain dict, for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HFFinetuneConfig:
        """Build from a dict, rejecting unknown keys by name."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"finetune config: unknown key(s) {unknown}")
        return cls(**values)


class NoGradientError(ValueError):
    """LoRA layers received no gradient: training would silently do nothing."""


def check_lora_gradients(model: nn.Module, step: int) -> None:
    """Refuse to go on when some lora_B has no (or an all-zero) gradient after a step.

    At the first step B = 0, so A's gradient is 0 by construction, but every B gets one. A
    missing B gradient is the known trap of reentrant gradient checkpointing over frozen
    inputs: the loss falls nowhere and the adapter never moves.
    """
    from minituner.lora import lora_layers

    dead = [name for name, layer in lora_layers(model) if layer.r > 0 and (
        layer.lora_B.grad is None or not bool(layer.lora_B.grad.abs().sum() > 0))]
    if dead:
        raise NoGradientError(
            f"after step {step}, {len(dead)} LoRA layer(s) got no gradient (first: {dead[0]}): "
            "the adapter would not train (reentrant gradient checkpointing over frozen inputs "
            "is the usual cause; minituner uses non-reentrant checkpointing)"
        )


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (gradients reach LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def padding_mask(target_mask: torch.Tensor) -> torch.Tensor:
    """Attention mask of a right-padded batch: every position up to the row's last target.

    Each row ends with a target (the EOS, or the last text token), so this is exactly its
    real tokens.
    """
    return (target_mask.flip(-1).cumsum(-1).flip(-1) > 0).long()


def make_hf_loss_fn(forward_model: nn.Module, device: torch.device):
    """loss_fn(model, batch) -> (summed NLL over masked targets, token count).

    ``forward_model`` is the model to call (the DDP wrapper when distributed), so that DDP
    sees the forward and synchronises the gradients. The LM head and the loss run chunked
    (:func:`minituner.training.losses.masked_lm_nll`) when the head is a plain Linear.
    """

    head = plain_output_head(getattr(forward_model, "module", forward_model))  # DDP: .module

    def loss_fn(model, batch: dict) -> tuple:
        ids = batch["input_ids"].to(device)
        attention = padding_mask(batch["target_mask"]).to(device)
        targets, mask = batch["targets"].to(device), batch["target_mask"].to(device)
        if head is not None:
            return masked_lm_nll(forward_model, head, ids, attention, targets, mask)
        out = forward_model(input_ids=ids, attention_mask=attention, use_cache=False)
        return masked_token_nll(out.logits, targets, mask)

    return loss_fn


def make_hf_validator(sequences: list, pad_id: int, device: torch.device, info: D.DistInfo,
                      batch_size: int = 8):
    """evaluate(model) -> {"val_loss", "val_ppl"}: each process scores its share, then sums."""
    from minituner.course.data import collate_sequences

    mine = sequences[info.rank::info.world_size]

    @torch.no_grad()
    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), batch_size):
            batch = collate_sequences(mine[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device), use_cache=False,
                           attention_mask=padding_mask(batch["target_mask"]).to(device)).logits
            nll, n = masked_token_nll(logits, batch["targets"].to(device),
                                      batch["target_mask"].to(device))
            total += torch.tensor([float(nll), float(n)], dtype=torch.float64)
        model.train(was_training)
        nll_sum, count = D.all_reduce_sum(total).tolist()
        loss = nll_sum / max(count, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    return evaluate


def runtime_settings(cfg: HFFinetuneConfig, device_name: str | None = "auto") -> dict:
    """Device and compute dtype this run uses (resolved from 'auto'), and the process group."""
    device = resolve_device(device_name)
    info = D.init_distributed(device)
    device = D.process_device(device, info)
    return {"device": device, "dtype": resolve_dtype(cfg.dtype, device), "dist": info}


def run_hf_finetune(cfg: HFFinetuneConfig, out_dir, resume: bool = False,
                    overwrite: bool = False, on_step=None, device: str | None = "auto",
                    on_start=None) -> dict:
    """Fine-tune ``cfg.model`` (hf:DIR) on ``cfg.data`` into the run folder ``out_dir``.

    ``on_start(info)`` gets the resolved settings and data counts before training (the CLI
    prints them); ``on_step(record)`` runs after each step on every process.
    """
    from minituner.course.finetune import total_steps
    from minituner.hf.run import (
        finish_run,
        prepare_hf_data,
        prepare_hf_model,
        start_run,
    )
    from minituner.training.checkpoint import RunWriter
    from minituner.training.loop import LoopConfig, build_optimizer, build_scheduler, fit
    from minituner.training.sampling import MixedBatches

    started = time.perf_counter()
    cfg.validate()
    runtime = runtime_settings(cfg, device)
    info, dev = runtime["dist"], runtime["device"]
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over "
                         f"{info.world_size} processes")
    prepared = prepare_hf_data(cfg)
    model = prepare_hf_model(cfg, runtime["dtype"], dev)
    writer = RunWriter(out_dir, enabled=info.is_main)
    config, checkpoint = start_run(cfg, model, prepared, runtime, out_dir, writer, resume,
                                   overwrite)
    rows = cfg.batch_size // info.world_size
    batches = MixedBatches(prepared.train.sequences, [], rows, 0, cfg.seed, prepared.pad_id,
                           info.rank, info.world_size)
    steps = total_steps(cfg, batches.batches_per_epoch)
    if on_start is not None:
        on_start({**runtime, "data": prepared, "steps": steps,
                  "resumed_from": checkpoint and checkpoint["step"]})
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, steps, int(cfg.warmup * steps))
    forward_model = D.wrap_ddp(model, info, dev)
    evaluate = (make_hf_validator(prepared.validation.sequences, prepared.pad_id, dev, info)
                if prepared.validation is not None else None)
    first = {"checked": False}

    def step_hook(record: dict) -> None:
        if not first["checked"]:
            check_lora_gradients(model, record["step"])
            first["checked"] = True
        if on_step is not None:
            on_step(record)

    loop = LoopConfig(steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                      eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    result = fit(model, make_hf_loss_fn(forward_model, dev), batches, optimizer, scheduler, loop,
                 evaluate=evaluate, writer=writer, on_step=step_hook, resume=checkpoint,
                 reduce_count=D.reduce_count, reduce_loss=D.reduce_float)
    results = finish_run(cfg, model, result, prepared, runtime, out_dir, writer, steps,
                         time.perf_counter() - started)
    D.barrier()
    return results
