"""Building the base model: corpus -> tokenizer -> Mini-GPT pretraining -> run folder."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from minituner.course import corpus
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.models.tokenizer import Tokenizer, train_tokenizer
from minituner.training.evaluation import evaluate_loss
from minituner.training.loop import PretrainConfig, pretrain, seed_everything
from minituner.training.runs import is_complete_model_run, prepare_run_dir, save_model, write_config
from minituner.util.files import atomic_write_json, atomic_write_text, run_manifest, sha256_file
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
    records = corpus.read_jsonl(Path(corpus_dir) / f"{split}.jsonl")
    return [tokenizer.encode(t, bos=True, eos=True) for t in corpus.pretraining_texts(records)]


def corpus_hashes(corpus_dir: str | Path) -> dict:
    """sha256 of every corpus file, by name."""
    folder = Path(corpus_dir)
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.jsonl"))} | {
        "tokenizer.json": sha256_file(folder / "tokenizer.json")
    }


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
) -> dict:
    """Pretrain a Mini-GPT into a run folder and return its results.

    The corpus is generated into ``out_dir/corpus`` with the run's seed. With ``reuse``, a
    complete run with the same config and data hashes is kept as is (the demo's cache).
    """
    model_cfg = model_cfg or MiniGPTConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    corpus_dir = out / CORPUS_DIR
    staging = out.parent / f".{out.name}.corpus.tmp"
    build_corpus(staging, seed=train_cfg.seed, context_len=model_cfg.context_len)
    data = corpus_hashes(staging)
    config = pretrain_run_config(model_cfg, train_cfg, data)
    if reuse and is_complete_model_run(out) and (out / "results.json").is_file():
        existing = json.loads((out / "config.json").read_text())
        if existing == config:
            _remove_tree(staging)
            return {**json.loads((out / "results.json").read_text()), "reused": True}
    prepare_run_dir(out, config, overwrite=overwrite)
    if corpus_dir.exists():
        _remove_tree(corpus_dir)
    staging.rename(corpus_dir)
    tokenizer = Tokenizer.load(corpus_dir / "tokenizer.json")
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(
            f"model vocab_size {model_cfg.vocab_size} != tokenizer size {tokenizer.vocab_size}"
        )
    train_seqs = load_corpus_split(corpus_dir, "train", tokenizer)
    val_seqs = load_corpus_split(corpus_dir, "validation", tokenizer)
    seed_everything(train_cfg.seed)
    model = MiniGPT(model_cfg)
    log = pretrain(model, train_seqs, val_seqs, tokenizer.pad_id, train_cfg, on_step=on_step)
    test_seqs = load_corpus_split(corpus_dir, "test", tokenizer)
    test_loss = evaluate_loss(model, test_seqs, tokenizer.pad_id)
    wall = time.perf_counter() - started
    results = {
        "val_loss": log[-1]["val_loss"],
        "val_ppl": log[-1]["val_ppl"],
        "test_ppl": math.exp(test_loss),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": train_cfg.steps,
        "wall_s": wall,
        "reused": False,
    }
    save_model(out, model, tokenizer)
    write_config(out, config)
    atomic_write_json(out / "manifest.json", run_manifest(train_cfg.seed, data_files={
        p.name: p for p in sorted(corpus_dir.iterdir()) if p.is_file()
    }))
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    plot_loss(log, out / "loss.png", title="Mini-GPT pretraining")
    atomic_write_json(out / "results.json", results)
    return results


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
