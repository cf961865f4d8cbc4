"""Building the base model: corpus -> tokenizer -> Mini-GPT pretraining -> run folder."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from minituner.course import corpus
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.models.tokenizer import Tokenizer, train_tokenizer
from minituner.training.checkpoint import RunWriter
from minituner.training.config import PretrainConfig
from minituner.training.evaluation import evaluate_loss
from minituner.training.loop import pretrain, seed_everything
from minituner.training.runs import (
    CONFIG_FILE,
    clear_checkpoints,
    discard_staging,
    is_complete_model_run,
    mark_failed,
    prepare_run_dir,
    publish_run,
    resume_state,
    save_model,
    write_config,
)
from minituner.util.files import atomic_write_json, read_json, run_manifest, sha256_file
from minituner.util.jsonl import read_jsonl
from minituner.util.plots import plot_loss

CORPUS_DIR = "corpus"


def build_corpus(out_dir: str | Path, seed: int = 0, context_len: int = 32) -> tuple:
    """Write the corpus and its tokenizer into ``out_dir``; returns (manifest, tokenizer)."""
    out = Path(out_dir)
    records = [s.to_record() for s in corpus.all_sentences() if corpus.is_pretraining_sentence(s)]
    tokenizer = train_tokenizer(corpus.pretraining_texts(records), context_len=context_len)
    tokenizer.save(out / "tokenizer.json")
    manifest = corpus.write_corpus(out, seed=seed, tokenizer=tokenizer)
    return manifest, tokenizer


def load_corpus_split(corpus_dir: str | Path, split: str, tokenizer: Tokenizer) -> list:
    """Token-id sequences (<bos> text <eos>) of a pretraining split, both languages."""
    records = read_jsonl(Path(corpus_dir) / f"{split}.jsonl")
    return [tokenizer.encode(t, bos=True, eos=True) for t in corpus.pretraining_texts(records)]


def corpus_hashes(corpus_dir: str | Path) -> dict:
    """sha256 of every corpus file, by name."""
    folder = Path(corpus_dir)
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.jsonl"))} | {
        "tokenizer.json": sha256_file(folder / "tokenizer.json")
    }


def check_batch_size(corpus_dir: str | Path, batch_size: int) -> None:
    """Refuse a batch larger than the corpus's training lines (one batch could never fill)."""
    lines = len(corpus.pretraining_texts(read_jsonl(Path(corpus_dir) / "train.jsonl")))
    if batch_size > lines:
        raise ValueError(f"--batch-size {batch_size} is larger than the corpus's {lines} "
                         "training lines (English and Spanish): lower --batch-size")


def pretrain_run_config(model_cfg: MiniGPTConfig, train_cfg: PretrainConfig, data: dict) -> dict:
    """The config.json of a pretraining run; identical configs and data mean the same run."""
    return {
        "kind": "pretrain",
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "data_sha256": data,
    }


def run_pretraining(
    out_dir: str | Path,
    train_cfg: PretrainConfig,
    model_cfg: MiniGPTConfig | None = None,
    overwrite: bool = False,
    reuse: bool = False,
    on_step: Callable[[dict], None] | None = None,
    resume: bool = False,
    on_start: Callable[[dict], None] | None = None,
) -> dict:
    """Pretrain a Mini-GPT into a run folder and return its results.

    The corpus is generated into ``out_dir/corpus`` with the run's seed. A folder holding an
    unfinished run is refused unless ``resume`` (continue from its last checkpoint; a run whose
    config or data differ is refused by name) or ``overwrite``. With ``reuse`` (the demo's
    cache), a complete run with the same config and data hashes is kept as is and an
    unfinished one is resumed. ``resume`` on a finished run trains nothing and returns its
    results with ``"already_complete": True``; ``on_start({"steps", "resumed_from"})`` is
    called before training. The folder rules are :func:`minituner.training.runs.prepare_run_dir`'s
    (a failed run is replaced by the corrected command).
    """
    train_cfg.validate()
    model_cfg = model_cfg or MiniGPTConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    staging = out.parent / f".{out.name}.corpus.tmp"
    try:
        build_corpus(staging, seed=train_cfg.seed, context_len=model_cfg.context_len)
        check_batch_size(staging, train_cfg.batch_size)
        config = pretrain_run_config(model_cfg, train_cfg, corpus_hashes(staging))
        same_run = _holds_run(out, config)
        if (reuse or resume) and same_run and _is_finished(out):
            return {**read_json(out / "results.json"), "reused": True, "already_complete": True}
        tokenizer = Tokenizer.load(staging / "tokenizer.json")
        if tokenizer.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"model vocab_size {model_cfg.vocab_size} != tokenizer size "
                             f"{tokenizer.vocab_size}")
        resuming = resume or (reuse and same_run)
        checkpoint = resume_state(out, config) if resuming else None
        work = out
        if checkpoint is None:
            work = prepare_run_dir(out, config, overwrite=overwrite)
            clear_checkpoints(work)
        _remove_tree(work / CORPUS_DIR)
        staging.rename(work / CORPUS_DIR)
    finally:
        _remove_tree(staging)
    write_config(work, config)
    if on_start is not None:
        on_start({"steps": train_cfg.steps, "resumed_from": checkpoint and checkpoint["step"]})
    try:
        results = _train(work, config, train_cfg, model_cfg, tokenizer, checkpoint, on_step,
                         started)
    except Exception as exc:
        if work == out:
            mark_failed(out, exc)
        discard_staging(work, out)
        raise
    publish_run(work, out)
    return results


def _train(out: Path, config: dict, train_cfg: PretrainConfig, model_cfg: MiniGPTConfig,
           tokenizer: Tokenizer, checkpoint: dict | None, on_step: Callable | None,
           started: float) -> dict:
    """Pretrain from scratch or ``checkpoint`` and write the finished run folder."""
    corpus_dir = out / CORPUS_DIR
    train_seqs = load_corpus_split(corpus_dir, "train", tokenizer)
    val_seqs = load_corpus_split(corpus_dir, "validation", tokenizer)
    seed_everything(train_cfg.seed)
    model = MiniGPT(model_cfg)
    writer = RunWriter(out)
    fitted = pretrain(model, train_seqs, val_seqs, tokenizer.pad_id, train_cfg, on_step=on_step,
                      writer=writer, resume=checkpoint)
    log = fitted.log
    test_seqs = load_corpus_split(corpus_dir, "test", tokenizer)
    test_loss = evaluate_loss(model, test_seqs, tokenizer.pad_id)
    results = {
        "val_loss": log[-1]["val_loss"],
        "val_ppl": log[-1]["val_ppl"],
        "test_ppl": math.exp(test_loss),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": train_cfg.steps,
        "resumed_from_step": fitted.resumed_from,
        "wall_s": time.perf_counter() - started,
        "reused": False,
    }
    save_model(out, model, tokenizer)
    atomic_write_json(out / "manifest.json", run_manifest(train_cfg.seed, data_files={
        p.name: p for p in sorted(corpus_dir.iterdir()) if p.is_file()
    }))
    writer.write_log(log)
    plot_loss(log, out / "loss.png", title="Mini-GPT pretraining")
    atomic_write_json(out / "results.json", results)
    return results


def _holds_run(out: Path, config: dict) -> bool:
    """True when ``out``'s config.json is ``config`` (the same run, finished or not)."""
    try:
        return read_json(out / CONFIG_FILE) == config
    except (OSError, ValueError):
        return False


def _is_finished(out: Path) -> bool:
    """True when the run in ``out`` wrote its weights and results (results.json comes last)."""
    return is_complete_model_run(out) and (out / "results.json").is_file()


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
