"""Fine-tuning a Mini-GPT base with LoRA, QLoRA or full fine-tuning, in one loop.

Against forgetting, two explicit options (both on by default, both documented in the report's
ablation): ``replay`` is the fraction of each batch's rows drawn from the base's pretraining
lines (trained with the ordinary next-token loss), and ``kl`` weighs a per-token
KL(base || tuned) on those replay rows, the frozen reference being the same model with its
adapters disabled (LoRA, QLoRA) or a frozen copy of the base (full fine-tuning). ``replay 0``
and ``kl 0`` give plain fine-tuning on the irregular examples alone.

A run folder holds config.json, manifest.json, results.json, train_log.jsonl, loss.png,
data/ (the exact examples), checkpoints/, and adapter/ (PEFT layout) for LoRA and QLoRA; a full
fine-tuning run holds model.safetensors + tokenizer.json instead of adapter/ (a model run).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from minituner.course import corpus, data
from minituner.course.evaluate import (
    builtin_path,
    evaluate_model,
    load_builtin_probes,
)
from minituner.course.objectives import make_loss_fn, make_validator, token_kl
from minituner.training.checkpoint import (
    CHECKPOINT_DIR,
    RunWriter,
    latest_checkpoint,
    load_checkpoint,
)
from minituner.training.config import DEFAULT_STEPS, METHODS, FinetuneConfig
from minituner.training.runs import load_model, prepare_run_dir
from minituner.util.files import atomic_write_json, peak_rss_bytes, run_manifest, sha256_json

__all__ = ["DEFAULT_STEPS", "METHODS", "FinetuneConfig", "FinetuneData", "ProgressSink",
           "build_trainable", "control_records", "load_base", "make_loss_fn", "make_validator",
           "prepare_data", "run_config", "run_finetune", "run_with_progress", "token_kl",
           "total_steps"]

PEAK_RSS_NOTE = ("peak resident memory of the whole process so far (ru_maxrss): Python, torch "
                 "and every import included, and every earlier run in the same process")


@dataclass
class FinetuneData:
    """Examples and encoded sequences of one run."""

    sft: dict
    train: list
    validation: list
    replay: list
    control: list
    control_texts: list


def load_base(base_dir: str | Path) -> tuple:
    """(model, tokenizer, config) of a base run folder, refusing adapter-only run folders."""
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base run folder not found")
    if not (base / "model.safetensors").is_file():
        raise ValueError(f"{base}: not a model run folder (no model.safetensors); pass a "
                         "pretrained or merged Mini-GPT run as --base")
    return load_model(base)


def control_records(base_dir) -> list:
    """The control set: regular-verb lines of the base's held-out pretraining test split (the
    built-in set when the base has no corpus; both agree for a seed-0 base)."""
    test_file = Path(base_dir) / "corpus" / "test.jsonl"
    if test_file.is_file():
        return data.build_control_set(corpus.read_jsonl(test_file))
    return corpus.read_jsonl(builtin_path("control_set"))


def prepare_data(base_dir: Path, tokenizer, cfg: FinetuneConfig) -> FinetuneData:
    """SFT splits (built-in or the user's files), replay lines and the control set."""
    corpus_dir = Path(base_dir) / "corpus"
    if cfg.train_data:
        sft = data.split_user_examples(data.load_user_examples(cfg.train_data), cfg.seed)
        if cfg.val_data:
            sft["train"] += sft["validation"] + sft["test"]
            sft["validation"], sft["test"] = data.load_user_examples(cfg.val_data), []
    else:
        if not (corpus_dir / "irregular.jsonl").is_file():
            raise ValueError(f"{base_dir}: has no corpus/irregular.jsonl; pass --train-data")
        sft = data.build_sft_set(corpus.read_jsonl(corpus_dir / "irregular.jsonl"), tokenizer)
    if not sft["validation"]:
        raise ValueError("the validation split is empty: give more examples or --val-data")
    replay: list = []
    if cfg.replay > 0:
        if not (corpus_dir / "train.jsonl").is_file():
            raise ValueError(f"{base_dir}: has no corpus/train.jsonl for --replay; use --replay 0")
        texts = corpus.pretraining_texts(corpus.read_jsonl(corpus_dir / "train.jsonl"))
        replay = [data.text_sequence(tokenizer, t) for t in texts]
    control = control_records(base_dir)
    return FinetuneData(
        sft=sft,
        train=data.sequences_of(sft["train"], tokenizer, "training"),
        validation=data.sequences_of(sft["validation"], tokenizer, "validation"),
        replay=replay, control=control, control_texts=data.control_texts(control),
    )


def build_trainable(model, cfg: FinetuneConfig) -> tuple:
    """Wrap or unfreeze ``model`` for the method; returns (model, reference logits function)."""
    if cfg.method == "full":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
        return model, frozen
    if cfg.method == "lora":
        from minituner.lora import wrap_minigpt_with_lora

        model = wrap_minigpt_with_lora(model, r=cfg.rank, alpha=cfg.alpha, seed=cfg.seed,
                                       **_targets(cfg))
    else:
        from minituner.quant.qlora import wrap_minigpt_qlora

        torch.manual_seed(cfg.seed)
        model = wrap_minigpt_qlora(model, r=cfg.rank, alpha=cfg.alpha,
                                   quant_scheme=cfg.quant_scheme)

    def reference(input_ids):
        from minituner.lora import disable_adapters

        with disable_adapters(model):
            return model(input_ids)

    return model, reference


def _targets(cfg: FinetuneConfig) -> dict:
    chosen = {} if cfg.targets is None else {"target_modules": list(cfg.targets)}
    return {**chosen, "dropout": cfg.dropout} if cfg.dropout else chosen


def ppl_by_tense(model, tokenizer, control: list) -> dict:
    """Control perplexity of each tense's lines (records without a "tense" are skipped)."""
    from minituner.course.evaluate import control_perplexity

    groups: dict = {}
    for record in control:
        if isinstance(record.get("tense"), str):
            groups.setdefault(record["tense"], []).append(record)
    return {tense: control_perplexity(model, tokenizer, data.control_texts(records))
            for tense, records in sorted(groups.items())}


def total_steps(cfg: FinetuneConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: --steps, or --epochs over the SFT training rows."""
    if cfg.epochs is None:
        return cfg.steps or DEFAULT_STEPS
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def run_config(base_dir: Path, base_model, cfg: FinetuneConfig, data_hash: str) -> dict:
    """config.json: what decides the run (used to refuse a mismatching --resume)."""
    from minituner.lora.adapters import base_fingerprint

    return {
        "kind": "finetune", "method": cfg.method, "model": base_model.config.to_dict(),
        "finetune": cfg.to_dict(),
        "base": {"path": str(Path(base_dir).resolve()),
                 "fingerprint": base_fingerprint(base_model)},
        "data_sha256": data_hash,
    }


def _write_data(out: Path, prepared: FinetuneData) -> None:
    for split, records in prepared.sft.items():
        atomic_write_json_lines(out / "data" / f"sft_{split}.jsonl", records)
    atomic_write_json_lines(out / "data" / "control.jsonl", prepared.control)


def atomic_write_json_lines(path: Path, records: list) -> None:
    """JSONL with sorted keys, atomically."""
    from minituner.util.files import atomic_write_text

    atomic_write_text(path, corpus.jsonl_text(records))


def run_finetune(base_dir, out_dir, cfg: FinetuneConfig, resume: bool = False,
                 overwrite: bool = False, on_step=None, on_start=None,
                 writer_enabled: bool = True) -> dict:
    """Fine-tune the base in ``base_dir`` into the run folder ``out_dir``; returns results.

    ``on_start(total_steps)`` and ``on_step(record)`` are progress callbacks (the library never
    prints); ``writer_enabled=False`` makes this process write nothing (non-zero ranks).
    """
    from minituner.training.loop import (
        LoopConfig,
        build_optimizer,
        build_scheduler,
        fit,
        seed_everything,
    )
    from minituner.util.plots import plot_loss

    started = time.perf_counter()
    cfg.validate()
    base_dir, out = Path(base_dir), Path(out_dir)
    model, tokenizer, _ = load_base(base_dir)
    prepared = prepare_data(base_dir, tokenizer, cfg)
    config = run_config(base_dir, model, cfg, sha256_json(
        {"sft": prepared.sft, "control": prepared.control, "replay": len(prepared.replay)}))
    checkpoint = _resume_state(out, config) if resume else None
    probes = load_builtin_probes()
    before = evaluate_model(model, tokenizer, probes, prepared.control_texts)
    before["control_ppl_by_tense"] = ppl_by_tense(model, tokenizer, prepared.control)
    seed_everything(cfg.seed)
    # Everything that can still reject a setting (--targets, rank 0, the batch split) runs
    # before the run folder is created or an old one is wiped.
    model, reference = build_trainable(model, cfg)
    from minituner.training.sampling import MixedBatches

    batches = MixedBatches(prepared.train, prepared.replay, cfg.batch_size - cfg.replay_rows,
                           cfg.replay_rows, cfg.seed, tokenizer.pad_id)
    steps = total_steps(cfg, batches.batches_per_epoch)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, steps, int(cfg.warmup * steps))
    loss_fn = make_loss_fn(reference, cfg.kl, cfg.replay_nll)
    writer = RunWriter(out, enabled=writer_enabled)
    if checkpoint is None:
        writer.write(prepare_run_dir, out, config, overwrite)
        writer.write(_clear_checkpoints, out)
    writer.write(atomic_write_json, out / "config.json", config)
    writer.write(_write_data, out, prepared)
    if on_start is not None:
        on_start(steps)
    loop = LoopConfig(steps=steps, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                      eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)
    result = fit(model, loss_fn, batches, optimizer, scheduler, loop,
                 evaluate=make_validator(prepared.validation, tokenizer.pad_id), writer=writer,
                 on_step=on_step, resume=checkpoint)
    after = evaluate_model(model, tokenizer, probes, prepared.control_texts)
    after["control_ppl_by_tense"] = ppl_by_tense(model, tokenizer, prepared.control)
    from minituner.training.accounting import training_state_bytes

    tensor_bytes = training_state_bytes(model, optimizer, loss_fn, batches(0))
    if cfg.method == "full" and cfg.kl > 0:  # the frozen copy the KL term compares against
        tensor_bytes["kl_reference_bytes"] = sum(
            t.numel() * t.element_size() for t in reference.state_dict().values())
        tensor_bytes["total_bytes"] += tensor_bytes["kl_reference_bytes"]
    results = _results(cfg, before, after, result, steps, batches, model, tensor_bytes)
    if cfg.method == "qlora":
        from minituner.course.qlora_eval import qlora_comparison

        results["qlora"] = qlora_comparison(base_dir, model, cfg, prepared, loss_fn, batches,
                                            tokenizer)
    writer.write(_save_trained, out, model, tokenizer, cfg, base_dir)
    writer.write(atomic_write_json, out / "manifest.json", run_manifest(
        cfg.seed, data_files={p.name: p for p in sorted((out / "data").glob("*.jsonl"))},
        base=str(base_dir.resolve())))
    writer.write_log(result.log)
    writer.write(plot_loss, result.log, out / "loss.png",
                 title=f"{cfg.method} r={cfg.rank} fine-tuning" if cfg.method != "full"
                 else "full fine-tuning")
    results["wall_s"] = time.perf_counter() - started
    results["peak_rss_bytes"] = peak_rss_bytes()
    writer.write(atomic_write_json, out / "results.json", results)
    return results


class ProgressSink(Protocol):
    """What :func:`run_with_progress` reports to (the CLI's tqdm ``Progress``)."""

    def start(self, total: int) -> None: ...

    def on_step(self, record: dict) -> None: ...

    def close(self) -> None: ...


def run_with_progress(base_dir: str | Path, out_dir: str | Path, cfg: FinetuneConfig,
                      progress: ProgressSink | None = None, *, resume: bool = False,
                      overwrite: bool = False) -> dict:
    """:func:`run_finetune` reporting to ``progress`` (closed when the run ends or fails)."""
    callbacks = {}
    if progress is not None:
        callbacks = {"on_start": progress.start, "on_step": progress.on_step}
    try:
        return run_finetune(base_dir, out_dir, cfg, resume=resume, overwrite=overwrite,
                            **callbacks)
    finally:
        if progress is not None:
            progress.close()


def _resume_state(out: Path, config: dict) -> dict | None:
    """The latest checkpoint of a run with the same config, or None when there is none yet."""
    from minituner.util.files import read_json

    if not (out / "config.json").is_file():
        return None
    if read_json(out / "config.json", "run config") != config:
        raise ValueError(f"{out}: --resume with settings or data that differ from the run's "
                         "config.json")
    path = latest_checkpoint(out)
    return load_checkpoint(path) if path else None


def _clear_checkpoints(out: Path) -> None:
    import shutil

    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def _save_trained(out: Path, model, tokenizer, cfg: FinetuneConfig, base_dir: Path) -> None:
    if cfg.method == "full":
        from minituner.training.runs import save_model

        save_model(out, model, tokenizer)
    else:
        from minituner.lora.adapters import save_adapter

        save_adapter(model, out / "adapter", base_model_name_or_path=str(base_dir.resolve()))


def _results(cfg, before: dict, after: dict, result, steps: int, batches, model,
             tensor_bytes: dict) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows_per_step = (cfg.batch_size - cfg.replay_rows) * cfg.grad_accum
    return {
        "method": cfg.method, "rank": cfg.rank if cfg.method != "full" else None,
        "alpha": cfg.alpha, "lr": cfg.lr, "replay": cfg.replay, "kl": cfg.kl, "seed": cfg.seed,
        "steps": steps, "epochs_seen": steps * rows_per_step / len(batches.sft),
        "best_step": result.best_step, "best_val_loss": result.best_metrics.get("val_loss"),
        "resumed_from_step": result.resumed_from,
        "irregular_accuracy_base": before["irregular_accuracy"],
        "irregular_accuracy_tuned": after["irregular_accuracy"],
        "regular_accuracy_base": before["regular_accuracy"],
        "regular_accuracy_tuned": after["regular_accuracy"],
        "control_ppl_base": before["control_ppl"],
        "control_ppl_tuned": after["control_ppl"],
        "control_ppl_change": after["control_ppl"] / before["control_ppl"] - 1.0,
        "control_ppl_by_tense_base": before["control_ppl_by_tense"],
        "control_ppl_by_tense_tuned": after["control_ppl_by_tense"],
        "slices_base": before["slices"], "slices_tuned": after["slices"],
        "trainable_params": trainable,
        "tensor_bytes": tensor_bytes,
        "peak_rss_note": PEAK_RSS_NOTE,
        "accuracy_note": ("fractions in [0, 1]; irregular = irregular-past + "
                          "irregular-participle probes on the held-out test frames"),
    }
