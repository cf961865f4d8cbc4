"""Run folders: where a trained Mini-GPT lives, and how it is saved, checked and loaded.

A model run folder holds ``config.json`` (with ``"kind"`` and the model config),
``manifest.json``, ``train_log.jsonl``, ``loss.png``, ``model.safetensors`` and
``tokenizer.json``. Writing into a folder that holds a different run is refused unless the
caller asks to overwrite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.models.tokenizer import Tokenizer
from minituner.training.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_checkpoint,
)
from minituner.training.config import RUNTIME_FIELDS
from minituner.util.files import (
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json,
)

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
RUN_FORMAT = 1  # config.json "format" of the run folders this version writes and reads


def check_run_format(config: dict, path: str | Path) -> dict:
    """``config`` (a run's config.json), refusing a run folder of an unknown or newer format."""
    version = config.get("format", RUN_FORMAT) if isinstance(config, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= RUN_FORMAT:
        raise ValueError(f"{path}: field 'format' is {version!r}; this minituner reads run "
                         f"folders of format 1 to {RUN_FORMAT} (a newer minituner wrote it?)")
    return config


def resume_identity(config: dict) -> dict:
    """The part of a fine-tuning run's config.json a --resume must match: all but the
    runtime settings (threads) that do not decide results."""
    finetune = {k: v for k, v in config.get("finetune", {}).items() if k not in RUNTIME_FIELDS}
    return {**config, "finetune": finetune}


def resume_state(out_dir: str | Path, config: dict) -> dict | None:
    """The latest checkpoint of the run in ``out_dir`` when its config.json matches ``config``
    (a ValueError naming the settings that differ otherwise); None when there is none yet."""
    out = Path(out_dir)
    if not (out / CONFIG_FILE).is_file():
        return None
    old = check_run_format(read_json(out / CONFIG_FILE, "run config"), out / CONFIG_FILE)
    if resume_identity(old) != resume_identity(config):
        raise ValueError(f"{out}: --resume with settings or data that differ from the run's "
                         f"config.json ({', '.join(_differences(old, config))})")
    path = latest_checkpoint(out)
    return load_checkpoint(path) if path else None


def _differences(old: dict, new: dict) -> list:
    """Names of the settings (``finetune.lr``) or sections that differ."""
    old, new = resume_identity(old), resume_identity(new)
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "finetune":
            names += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            names.append(key)
    return names


def clear_checkpoints(out_dir: str | Path) -> None:
    """Remove a run folder's checkpoints (a fresh run in a reused folder)."""
    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)


def load_base_run(base_dir: str | Path) -> tuple:
    """(model, tokenizer, config) of a Mini-GPT base run folder, refusing adapter-only runs."""
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base run folder not found")
    if not (base / MODEL_FILE).is_file():
        raise ValueError(f"{base}: not a model run folder (no {MODEL_FILE}); pass a "
                         "pretrained or merged Mini-GPT run as --base")
    return load_model(base)


def run_identity(config: dict) -> dict:
    """The part of a run's config that decides whether two runs are the same run."""
    return {k: v for k, v in config.items() if k not in ("created", "wall_s")}


def prepare_run_dir(out_dir: str | Path, config: dict, overwrite: bool = False) -> Path:
    """Create ``out_dir`` for a run, refusing one that holds a different run."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")
    existing = out / CONFIG_FILE
    if existing.is_file() and not overwrite:
        try:
            old = read_json(existing)
        except ValueError:
            old = None
        if old is not None:
            check_run_format(old, existing)
        if old is None or run_identity(old) != run_identity(config):
            raise FileExistsError(
                f"{out}: already holds a different run (pass --overwrite to replace it)"
            )
    elif out.is_dir() and any(out.iterdir()) and not existing.is_file() and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty and holds no run (use --overwrite)")
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def is_complete_model_run(run_dir: str | Path) -> bool:
    """True when a folder holds a finished model run (config, weights, tokenizer)."""
    run = Path(run_dir)
    return all((run / name).is_file() for name in (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE))


def save_model(run_dir: str | Path, model: MiniGPT, tokenizer: Tokenizer) -> None:
    """Write the weights and the tokenizer of a Mini-GPT run (atomically)."""
    run = Path(run_dir)
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_safetensors(run / MODEL_FILE, state, metadata={"format": "minituner-minigpt"})
    tokenizer.save(run / TOKENIZER_FILE)


def load_run_config(run_dir: str | Path) -> dict:
    """Read a run's config.json, with a clear error when the folder is not a run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    if not (run / CONFIG_FILE).is_file():
        raise ValueError(f"{run}: not a run folder (no {CONFIG_FILE})")
    config = check_run_format(read_json(run / CONFIG_FILE, "run config"), run / CONFIG_FILE)
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{run / CONFIG_FILE}: field 'model' missing (not a Mini-GPT run)")
    return config


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple:
    """(MiniGPT, Tokenizer, config) of a run folder, checking every weight's name and shape."""
    run = Path(run_dir)
    config = load_run_config(run)
    model_cfg = MiniGPTConfig.from_dict(config["model"])
    state = load_safetensors(run / MODEL_FILE)
    model = MiniGPT(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{run / MODEL_FILE}: weights do not match the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{run / MODEL_FILE}: {name} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    return model.to(device), tokenizer, config


def write_config(run_dir: str | Path, config: dict) -> Path:
    """Write config.json of a run."""
    return atomic_write_json(Path(run_dir) / CONFIG_FILE, config)
