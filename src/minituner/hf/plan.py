"""The preflight plan of a transformers fine-tuning run (``finetune ... --plan``).

From the exact settings and the data as the run tokenizes it, without loading the model or
writing anything: the run's batches (the same seeded sampler the run uses, so the widths are
the run's own), the number of steps and tokens, the padding fraction with and without packing,
the predicted peak memory in the planner's four buckets
(:func:`minituner.training.memory.plan_memory` at the run's widest micro-batch, with the
chunked loss and, when packing, the block-diagonal mask), and a warning when ``--threads``
asks for more cores than this process may use. A finished run records the same prediction
beside its measured peak (:func:`measured_peak`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from minituner.hf.models import (
    dtype_name,
    quiet_transformers,
    read_hf_config,
    resolve_device,
    resolve_dtype,
)
from minituner.hf.packing import check_packing_config
from minituner.hf.run import HFPrepared, prepare_hf_data
from minituner.hf.tokens import token_modules_to_save
from minituner.lora.saved_modules import resolve_modules_to_save
from minituner.models.specs import model_spec
from minituner.quant.qlora import parse_quant_scheme
from minituner.training.config import FinetuneConfig, base_method, uses_dora
from minituner.training.loop import total_steps
from minituner.training.memory import plan_memory
from minituner.training.packing import input_length, pack_sequences, padding_stats
from minituner.training.sampling import EpochSampler
from minituner.util.files import peak_rss_bytes

__all__ = ["batch_layout", "measured_peak", "plan_finetune", "plan_from_data", "plan_text",
           "predict_memory", "resident_bytes", "trained_module_params", "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity set; os.cpu_count() elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resident_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc/self/statm), or None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _row_tokens(row) -> tuple:
    """(input tokens, target tokens) of a sequence or a packed row."""
    parts = row["pack"] if isinstance(row, dict) and "pack" in row else [row]
    inputs = sum(input_length(p) for p in parts)
    targets = sum(sum(p["mask"]) if isinstance(p, dict) else input_length(p) for p in parts)
    return inputs, targets


def batch_layout(rows: list, cfg: FinetuneConfig, world_size: int = 1) -> dict:
    """Steps, tokens, widest micro-batch and padding of a run over ``rows`` (sequences or
    packed rows) in the run's own order; {"error": ...} when the rows cannot fill one batch."""
    per_process = cfg.batch_size // world_size
    try:
        sampler = EpochSampler(len(rows), per_process, cfg.seed, 0, world_size)
    except ValueError as exc:
        return {"rows": len(rows), "error": str(exc)}
    steps = total_steps(cfg, sampler.batches_per_epoch)
    sizes = [_row_tokens(row) for row in rows]
    batches, targets = [], 0
    for micro_step in range(steps * cfg.grad_accum):
        picked = [sizes[i] for i in sampler.indices(micro_step)]
        batches.append((max(n for n, _ in picked), [n for n, _ in picked]))
        targets += sum(t for _, t in picked)
    stats = padding_stats(batches)
    return {"rows": len(rows), "steps": steps, "micro_batches": len(batches),
            "batch_rows": per_process, "max_width": max(w for w, _ in batches),
            "tokens": stats["tokens"] * world_size, "target_tokens": targets * world_size,
            "padding_fraction": stats["padding_fraction"]}


def trained_module_params(cfg: FinetuneConfig, vocab_size: int | None = None) -> int:
    """Parameters of the modules the run trains in full (``--modules-to-save``; with
    ``--add-tokens`` also the embedding and the head), counted on a meta-device copy of the
    model (nothing allocated). Each module is its own trainable copy, so a tied head counts
    apart from its embedding. ``vocab_size``: the grown vocabulary of ``--add-tokens``."""
    if not (cfg.modules_to_save or cfg.add_tokens):
        return 0
    from transformers import AutoModelForCausalLM  # optional dependency

    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_hf_config(cfg.model))
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
    names = token_modules_to_save(model, cfg.modules_to_save) if cfg.add_tokens \
        else cfg.modules_to_save
    return sum(param.numel() for path in resolve_modules_to_save(model, names)
               for param in model.get_submodule(path).parameters())


def predict_memory(cfg: FinetuneConfig, batch_rows: int, seq: int,
                   compute_dtype: torch.dtype, vocab_size: int | None = None) -> dict:
    """The planner's prediction for one process of this run: total and the four buckets, or
    {"error": ...} for a model the planner cannot read. ``vocab_size``: the vocabulary grown
    by ``--add-tokens`` (default: the model's)."""
    dtype = dtype_name(compute_dtype)
    blocksize, double = parse_quant_scheme(cfg.quant_scheme)
    try:
        spec = model_spec(cfg.model)
        if vocab_size is not None and vocab_size > spec.vocab_size:
            spec = dataclasses.replace(spec, vocab_size=vocab_size)
        plan = plan_memory(spec, base_method(cfg.method), rank=cfg.rank, batch=batch_rows,
                           seq=seq, grad_checkpointing=cfg.grad_checkpointing, base_dtype=dtype,
                           adapter_dtype="fp32", compute_dtype=dtype,
                           quant="nf4-dq" if double else "nf4", blocksize=blocksize,
                           chunked_loss=True, packed_mask=bool(cfg.packing),
                           trained_modules_params=trained_module_params(cfg, vocab_size))
    except (ValueError, FileNotFoundError) as exc:
        return {"error": str(exc)}
    out = {"total_bytes": plan.total_bytes, "buckets": dict(plan.buckets),
           "batch": batch_rows, "seq": seq}
    if plan.assumptions["trained_modules_params"]:
        out["trained_modules_params"] = plan.assumptions["trained_modules_params"]
    if uses_dora(cfg.method):
        out["note"] = "DoRA's magnitude vectors and norms are not counted (planned as LoRA)"
    return out


def plan_from_data(cfg: FinetuneConfig, prepared: HFPrepared, compute_dtype: torch.dtype,
                   world_size: int = 1) -> dict:
    """The plan of a run whose data is already encoded (used by --plan and by the run)."""
    sequences = prepared.train.sequences
    layouts = {"unpacked": batch_layout(sequences, cfg, world_size),
               "packed": batch_layout(pack_sequences(sequences, prepared.max_len), cfg,
                                      world_size)}
    used = layouts["packed" if cfg.packing else "unpacked"]
    plan = {"model": cfg.model, "method": cfg.method, "packing": bool(cfg.packing),
            "max_len": prepared.max_len, "examples": len(sequences),
            "compute_dtype": dtype_name(compute_dtype), "layouts": layouts}
    if "error" in used:
        raise ValueError(used["error"] + (" (packed rows)" if cfg.packing else ""))
    plan.update(steps=used["steps"], tokens=used["tokens"], target_tokens=used["target_tokens"],
                memory=predict_memory(cfg, used["batch_rows"], used["max_width"],
                                      compute_dtype, _grown_vocab(prepared)))
    return plan


def _grown_vocab(prepared: HFPrepared) -> int | None:
    """The vocabulary size after ``--add-tokens`` (None: the model's own)."""
    return None if prepared.added_tokens is None else prepared.added_tokens["vocab_size"]


def plan_finetune(cfg: FinetuneConfig, device: str | None = "auto") -> dict:
    """The preflight plan of ``cfg`` (an hf: run): reads the data, loads no weights."""
    cfg.validate()
    if not cfg.train_data:
        raise ValueError("--data: give the training JSONL file for an hf: model")
    compute_dtype = resolve_dtype(cfg.dtype, resolve_device(device))
    prepared = prepare_hf_data(cfg)
    if cfg.packing:
        check_packing_config(read_hf_config(cfg.model), prepared.max_len)
    plan = plan_from_data(cfg, prepared, compute_dtype)
    cores = usable_cores()
    plan["threads"] = {"requested": cfg.threads, "usable_cores": cores}
    plan["warnings"] = []
    if cfg.threads > cores:
        plan["warnings"].append(f"--threads {cfg.threads} exceeds the {cores} core(s) this "
                                "process may use: the extra threads only wait for each other")
    if prepared.train.truncated:
        plan["warnings"].append(f"{len(prepared.train.truncated)} training example(s) are "
                                f"longer than {prepared.max_len} tokens and would be truncated")
    return plan


def measured_peak(rss_before: int | None, device: torch.device) -> dict:
    """Measured peak memory growth since ``rss_before`` (CPU: peak RSS; CUDA: peak allocated)."""
    out = {}
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if rss_before is not None:
        out["peak_rss_growth_bytes"] = _peak_resident_bytes() - rss_before
    return out


def _peak_resident_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


MB = 1e6


def plan_text(plan: dict) -> list:
    """The plan as the lines ``finetune --plan`` prints."""
    lines = [f"plan for {plan['method']} on {plan['model']} ({plan['compute_dtype']}), "
             f"{plan['examples']} training examples, rows of up to {plan['max_len']} tokens"
             f"{', packed' if plan['packing'] else ''}:",
             f"  steps {plan['steps']}, input tokens {plan['tokens']:,}, target tokens "
             f"{plan['target_tokens']:,}"]
    for name, layout in plan["layouts"].items():
        chosen = " (this run)" if (name == "packed") == plan["packing"] else ""
        if "error" in layout:
            lines.append(f"  {name}{chosen}: {layout['rows']} rows; {layout['error']}")
            continue
        lines.append(f"  {name}{chosen}: {layout['rows']} rows, padding fraction "
                     f"{layout['padding_fraction']:.3f}, widest batch {layout['batch_rows']} x "
                     f"{layout['max_width']}, {layout['steps']} steps")
    memory = plan["memory"]
    if "error" in memory:
        lines.append(f"  peak memory: not predicted ({memory['error']})")
    else:
        buckets = ", ".join(f"{k} {v / MB:,.1f}" for k, v in memory["buckets"].items())
        lines.append(f"  predicted peak memory {memory['total_bytes'] / MB:,.1f} MB "
                     f"(batch {memory['batch']} x {memory['seq']}): {buckets} MB")
        if memory.get("trained_modules_params"):
            lines.append(f"  trained in full beside the adapters (--modules-to-save): "
                         f"{memory['trained_modules_params']:,} parameters")
        if memory.get("note"):
            lines.append(f"  note: {memory['note']}")
    lines += [f"warning: {w}" for w in plan.get("warnings", [])]
    return lines

