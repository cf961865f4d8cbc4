"""The parts of a transformers fine-tuning run around the loop: data, model, run folder, results.

Used by :func:`minituner.hf.finetune.run_hf_finetune`. Every write goes through the run's
:class:`minituner.training.checkpoint.RunWriter`, which writes only on rank 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.data import EncodedData, encode_examples, read_examples, split_validation
from minituner.hf.models import (
    apply_hf_lora,
    context_length,
    dtype_name,
    load_hf_tokenizer,
    read_hf_config,
)
from minituner.util.files import atomic_write_json, atomic_write_text, peak_rss_bytes, run_manifest


@dataclass
class HFPrepared:
    """Encoded train/validation data of a run and what produced it."""

    train: EncodedData
    validation: EncodedData | None
    train_records: list
    validation_records: list
    pad_id: int
    max_len: int
    context: int | None


def prepare_hf_data(cfg) -> HFPrepared:
    """Read, split and encode the JSONL data for ``cfg.model``'s tokenizer and context."""
    config = read_hf_config(cfg.model)
    tokenizer = load_hf_tokenizer(cfg.model)
    context = context_length(config)
    if cfg.max_len is not None and context is not None and cfg.max_len > context:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's context of {context} "
                         "tokens")
    max_len = cfg.max_len or context or 1024
    examples = read_examples(cfg.data)
    validation_examples: list = []
    if cfg.val_data:
        validation_examples = read_examples(cfg.val_data)
    elif cfg.val_fraction:
        examples, validation_examples = split_validation(examples, cfg.val_fraction, cfg.seed)
    encode = {"max_len": max_len, "chat_template": cfg.chat_template, "strict": cfg.strict_len}
    train = encode_examples(tokenizer, examples, where=str(cfg.data), **encode)
    validation = None
    if validation_examples:
        where = str(cfg.val_data or cfg.data)
        validation = encode_examples(tokenizer, validation_examples, where=where, **encode)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return HFPrepared(train, validation, [r for _, r in examples],
                      [r for _, r in validation_examples], pad_id, max_len, context)


def prepare_hf_model(cfg, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The base (float for LoRA, NF4 for QLoRA) with LoRA applied, in training mode.

    ``model.base_record`` says how the base was loaded and ``model.base_fingerprint`` is its
    :func:`minituner.lora.adapters.base_fingerprint` (hashed once: config.json and the adapter
    both record it).
    """
    from minituner.hf.finetune import enable_grad_checkpointing
    from minituner.hf.load import base_record, load_base
    from minituner.lora.adapters import base_fingerprint

    record = base_record(cfg.model, cfg.method, dtype, cfg.quant_scheme)
    model = load_base(record, device=device)
    apply_hf_lora(model, cfg.targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                  init="kaiming", use_rslora=cfg.use_rslora, seed=cfg.seed)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.base_record = record
    model.base_fingerprint = base_fingerprint(model)
    return model.train()


def run_config(cfg, model: nn.Module, prepared: HFPrepared, dtype: torch.dtype) -> dict:
    """config.json: what decides the run (a --resume with anything else is refused).

    The device and the process count are left out: a run may resume on another of either.
    """
    from minituner.util.files import sha256_json

    return {
        "kind": "finetune-hf", "method": cfg.method, "finetune": cfg.to_dict(),
        "compute_dtype": dtype_name(dtype),
        "base": {**model.base_record, "model_type": model.config.model_type,
                 "fingerprint": model.base_fingerprint},
        "data_sha256": sha256_json({"train": prepared.train_records,
                                    "validation": prepared.validation_records}),
    }


def _write_records(out: Path, prepared: HFPrepared) -> None:
    lines = {"train": prepared.train_records, "validation": prepared.validation_records}
    for split, records in lines.items():
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        atomic_write_text(out / "data" / f"{split}.jsonl", text)


def start_run(cfg, model, prepared, runtime, out_dir, writer, resume: bool,
              overwrite: bool) -> tuple:
    """Create (rank 0) or reopen the run folder; returns (config, checkpoint to resume or None)."""
    from minituner.course.finetune import _clear_checkpoints, _resume_state
    from minituner.training.distributed import barrier
    from minituner.training.runs import prepare_run_dir

    out = Path(out_dir)
    config = run_config(cfg, model, prepared, runtime["dtype"])
    barrier()  # every process has read the folder's old config before rank 0 touches it
    checkpoint = _resume_state(out, config) if resume else None
    barrier()
    if checkpoint is None:
        writer.write(prepare_run_dir, out, config, overwrite)
        writer.write(_clear_checkpoints, out)
    writer.write(atomic_write_json, out / "config.json", config)
    writer.write(_write_records, out, prepared)
    barrier()
    return config, checkpoint


def _base_parameter_count(model: nn.Module) -> int:
    """Frozen parameters, NF4 weights counted as the values they stand for."""
    from minituner.quant.qlora import QuantizedLinear

    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen + sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                        for m in model.modules() if isinstance(m, QuantizedLinear))


def _write_manifest(cfg, model, runtime, out: Path) -> None:
    """manifest.json (hashes the data files, so only the writing rank builds it)."""
    atomic_write_json(out / "manifest.json", run_manifest(
        cfg.seed, data_files={p.name: p for p in sorted((out / "data").glob("*.jsonl"))},
        base=model.base_record["path"], world_size=runtime["dist"].world_size,
        device=str(runtime["device"])))


def finish_run(cfg, model, result, prepared, runtime, out_dir, writer, steps: int,
               wall_s: float) -> dict:
    """Save the adapter, manifest, log, plot and results (rank 0); returns the results."""
    from minituner.lora.adapters import save_adapter
    from minituner.util.plots import plot_loss

    out = Path(out_dir)
    log = result.log
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = _base_parameter_count(model)
    this_process = [r for r in log if r["step"] > (result.resumed_from or 0)]
    tokens = sum(r.get("target_tokens", 0) for r in this_process)
    train_time = this_process[-1]["elapsed_s"] if this_process else 0.0
    results = {
        "method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha, "steps": steps,
        "final_loss": log[-1]["loss"] if log else None,
        "best_step": result.best_step, "best_val_loss": result.best_metrics.get("val_loss"),
        "best_val_ppl": result.best_metrics.get("val_ppl"),
        "resumed_from_step": result.resumed_from,
        "trainable_params": trainable, "base_params": base,
        "device": str(runtime["device"]), "compute_dtype": dtype_name(runtime["dtype"]),
        "world_size": runtime["dist"].world_size, "global_batch": cfg.batch_size,
        "train_examples": len(prepared.train.sequences),
        "validation_examples": 0 if prepared.validation is None else
        len(prepared.validation.sequences),
        "truncated_lines": prepared.train.truncated, "dropped_lines": prepared.train.dropped,
        "max_len": prepared.max_len,
        "target_tokens_per_s": tokens / train_time if train_time else None,
        "wall_s": wall_s, "peak_rss_bytes": peak_rss_bytes(),
    }
    writer.write(save_adapter, model, out / "adapter",
                 base_model_name_or_path=model.base_record["path"], extra=model.base_record,
                 fingerprint=model.base_fingerprint)
    writer.write(_write_manifest, cfg, model, runtime, out)
    writer.write_log(log)
    writer.write(plot_loss, log, out / "loss.png",
                 title=f"{cfg.method} r={cfg.rank} on {Path(model.base_record['path']).name}")
    writer.write(atomic_write_json, out / "results.json", results)
    return results
