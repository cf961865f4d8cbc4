"""Run folders: where a trained Mini-GPT lives, and how it is saved, checked and loaded.

A model run folder holds ``config.json`` (with ``"kind"`` and the model config),
``manifest.json``, ``train_log.jsonl``, ``loss.png``, ``model.safetensors`` and
``tokenizer.json``. Writing into a folder that holds a different run is refused unless the
caller asks to overwrite, and ``overwrite`` replaces only a folder minituner wrote
(:func:`minituner_folder`); a folder holding anything else is refused, naming what it holds.

A run is *finished* when it wrote ``results.json`` (a merged run: its config.json, written
last), *failed* when training stopped on an error (``failed.json``), *unfinished* otherwise.
Starting a run over a folder:

- the same run, unfinished with checkpoints: refused ("N steps done; pass --resume to continue
  or --overwrite to start over");
- a failed run is replaced by any run without --overwrite (a retry with another --lr): it
  holds nothing to keep; every check that can refuse a run runs before its folder is made;
- any other different run needs --overwrite.

``--overwrite`` of a folder that holds something trains in a staging folder beside it
(:func:`run_work_dir`) and swaps the finished run in (:func:`publish_run`): a kill at any moment
leaves the old folder or the new one whole.

What a ``--resume`` may change (everything else is refused naming the settings and both
values), :data:`RESUME_MAY_CHANGE`: the thread count, the process count and the device (they
are not part of config.json), ``fsdp``, ``report_to``, ``allow_pickle``, the base's fingerprint
when ``verify_base`` is False (with a warning), and a larger ``steps`` or ``epochs``. With a
larger total the learning-rate schedule is recomputed for the new total (warmup and cosine
decay as if the run had been planned that long; the resumed step continues on that curve), so
such a run no longer equals an uninterrupted run of either length.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.models.tokenizer import Tokenizer
from minituner.training.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_latest_checkpoint,
)
from minituner.training.config import RUNTIME_FIELDS
from minituner.util.files import (
    atomic_save_safetensors,
    atomic_write_json,
    fsync_tree,
    load_safetensors,
    read_json,
    recover_directory,
    remove_directory,
    replace_directory,
)

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
RUN_FORMAT = 1  # config.json "format" of the run folders this version writes and reads
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"  # written when training stops on an error
RUN_KINDS = ("pretrain", "finetune", "finetune-hf", "merged")  # config.json "kind"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_MARKERS = ("merge_report.json",)  # a merged transformers directory
RESUME_MAY_CHANGE = ("threads", "process count", "device", "--fsdp on or off", "--report-to",
                     "--allow-pickle", "the base's fingerprint with --no-verify-base",
                     "a larger steps or epochs")
_GROWABLE = ("steps", "epochs")  # a resume may raise these (the schedule is recomputed)
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_write's temp files (mkstemp)


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
    """The latest readable checkpoint of the run in ``out_dir`` when its config.json matches
    ``config`` up to :data:`RESUME_MAY_CHANGE` (a ValueError naming each other setting that
    differs, with both values); None when there is none yet. A damaged newest checkpoint is
    skipped with a one-line UserWarning naming it and the step resumed from instead."""
    out = Path(out_dir)
    if not (out / CONFIG_FILE).is_file():
        return None
    old = check_run_format(read_json(out / CONFIG_FILE, "run config"), out / CONFIG_FILE)
    old = _moved_base(old, config)
    if config.get("finetune", {}).get("verify_base") is False:
        old = _unverified_base(old, config, out)
    differences = resume_differences(old, config)
    if differences:
        shown = "; ".join(f"{name}: run {a!r}, now {b!r}" for name, a, b in differences[:4])
        raise ValueError(f"{out}: --resume cannot change {shown} (a resume may change only "
                         f"{', '.join(RESUME_MAY_CHANGE)}; --overwrite starts over)")
    remove_stale_tmp(out)
    state, skipped = load_latest_checkpoint(out)
    if skipped:
        names = ", ".join(p.name for p in skipped)
        warnings.warn(f"{out}: checkpoint {names} is damaged (a crash during its write?); "
                      f"resuming from the previous one, step {state['step']}", stacklevel=2)
    return state


def _moved_base(old: dict, new: dict) -> dict:
    """``old`` with the new base path when the run and its base moved together (the same
    ``relative_path``): the base is still the same one, at the same place beside the run."""
    old_base, new_base = old.get("base"), new.get("base")
    if not (isinstance(old_base, dict) and isinstance(new_base, dict)):
        return old
    relative = old_base.get("relative_path")
    if relative is None or relative != new_base.get("relative_path"):
        return old
    finetune = {**old.get("finetune", {}), "model": new.get("finetune", {}).get("model")}
    return {**old, "base": {**old_base, "path": new_base.get("path")}, "finetune": finetune}


def _unverified_base(old: dict, new: dict, out: Path) -> dict:
    """``old`` with its base fingerprint taken from ``new`` (--no-verify-base), warning when
    they differ: the resumed run goes on over a base other than the one it started on."""
    old_base, new_base = old.get("base"), new.get("base")
    if not (isinstance(old_base, dict) and isinstance(new_base, dict)):
        return old
    if old_base.get("fingerprint") != new_base.get("fingerprint"):
        warnings.warn(f"{out}: the base's fingerprint differs from the one this run started on; "
                      "resuming anyway (--no-verify-base)", stacklevel=3)
    return {**old, "base": {**old_base, "fingerprint": new_base.get("fingerprint")}}


def remove_stale_tmp(run_dir: str | Path) -> list:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files a killed atomic write left in a run folder (no
    writer is running when a folder is opened); returns the paths removed."""
    removed = []
    for path in sorted(Path(run_dir).rglob(".*.tmp")):
        if _TMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def resume_differences(old: dict, new: dict) -> list:
    """(setting, run's value, new value) of every difference a --resume may not make."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key in ("finetune", "train"):
            for name in sorted(set(a) | set(b)):
                if not _may_change(name, a.get(name), b.get(name)):
                    found.append((f"{key}.{name}", a.get(name), b.get(name)))
        elif a != b and key not in ("created", "wall_s"):
            found.append((key, _short(a), _short(b)))
    return found


def _may_change(name: str, old: Any, new: Any) -> bool:
    if old == new or name in RUNTIME_FIELDS:
        return True
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
    return name in _GROWABLE and numbers and new > old


def _short(value: Any) -> Any:
    """A value short enough for a one-line error (a whole section becomes its type name)."""
    return value if not isinstance(value, dict | list) else f"<{type(value).__name__}>"


def run_status(out_dir: str | Path) -> str | None:
    """'finished', 'failed' or 'unfinished' for a run folder; None for no run."""
    out = Path(out_dir)
    try:
        config = read_json(out / CONFIG_FILE)
    except (OSError, ValueError):
        return None
    if not _is_run_config(config):
        return None
    if (out / RESULTS_FILE).is_file() or config.get("kind") == "merged":
        return "finished"
    return "failed" if (out / FAILED_FILE).is_file() else "unfinished"


def _is_run_config(config: Any) -> bool:
    """A config.json minituner wrote: a known kind, or the pipeline's "format" with any backend's
    kind."""
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        return False
    version = config.get("format")
    return config["kind"] in RUN_KINDS or (isinstance(version, int) and not
                                           isinstance(version, bool))


def steps_done(out_dir: str | Path) -> int:
    """Steps an unfinished run saved in its newest readable checkpoint, the one a --resume
    starts from (0 without one; a damaged newest checkpoint does not count)."""
    try:
        state, _ = load_latest_checkpoint(out_dir)
    except ValueError:  # none readable, or one holding NaN: nothing to resume
        return 0
    return int(state["step"]) if state else 0


def refuse_unfinished(out_dir: str | Path) -> None:
    """Refuse to start again over an unfinished run that has checkpoints (FileExistsError)."""
    out = Path(out_dir)
    last = latest_checkpoint(out)
    if run_status(out) == "unfinished" and last is not None:
        raise FileExistsError(f"{out}: unfinished run (last checkpoint {last.name}): "
                              f"{steps_done(out)} steps done; pass --resume to continue or "
                              "--overwrite to start over")


def mark_failed(out_dir: str | Path, error: BaseException) -> None:
    """Record that a run stopped on ``error``, so the corrected command may replace it."""
    atomic_write_json(Path(out_dir) / FAILED_FILE,
                      {"error": f"{type(error).__name__}: {error}"[:500],
                       "steps_done": steps_done(out_dir)})


def minituner_folder(path: str | Path) -> str | None:
    """What minituner output a folder holds ('run folder (kind finetune)', 'adapter folder',
    'merged model folder'), or None when minituner did not write it."""
    folder = Path(path)
    status = run_status(folder)
    if status is not None:
        kind = read_json(folder / CONFIG_FILE).get("kind")
        return f"{status} run folder (kind {kind})"
    if all((folder / name).is_file() for name in ADAPTER_FILES):
        return "adapter folder"
    if any((folder / name).is_file() for name in MERGED_MARKERS):
        return "merged model folder"
    return None


def check_replaceable(path: str | Path) -> None:
    """Refuse to replace ``path`` unless it is empty, missing or a folder minituner wrote."""
    out = Path(path)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: --out is a file, not a folder minituner wrote; "
                              "--overwrite will not replace it")
    names = sorted(p.name for p in out.iterdir())
    if names and minituner_folder(out) is None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(f"{out}: holds {shown}, not a run, adapter or merged model "
                              "minituner wrote; --overwrite replaces only those: choose another "
                              "--out")


def clear_checkpoints(out_dir: str | Path) -> None:
    """Remove a run folder's checkpoints, results and failure mark (a fresh run in a reused
    folder: until it finishes, the folder is an unfinished run)."""
    out = Path(out_dir)
    (out / RESULTS_FILE).unlink(missing_ok=True)
    (out / FAILED_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def load_base_run(base_dir: str | Path) -> tuple:
    """(model, tokenizer, config) of a Mini-GPT base run folder, refusing adapter-only runs."""
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base run folder not found")
    if not (base / MODEL_FILE).is_file():
        raise ValueError(f"{base}: not a model run folder (no {MODEL_FILE}); pass a "
                         "pretrained or merged Mini-GPT run as --base")
    return load_model(base)


def with_relative_base(config: dict, out_dir: str | Path) -> dict:
    """``config`` whose ``base`` section also records its ``path`` relative to the run folder
    (``relative_path``), so a run and its base moved together keep working."""
    base = config.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        return config
    try:
        relative = os.path.relpath(Path(base["path"]).resolve(), Path(out_dir).resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return config
    return {**config, "base": {**base, "relative_path": Path(relative).as_posix()}}


def recorded_base_path(config: dict, run_dir: str | Path, marker: str) -> str:
    """The base folder a run's config.json records: ``relative_path`` seen from the run folder
    when a base is there (it holds ``marker``; run and base moved together), else ``path``.
    A missing or malformed ``base`` is a one-line ValueError naming the field."""
    run = Path(run_dir)
    base = config.get("base")
    where = run / CONFIG_FILE
    if base is None:
        raise ValueError(f"{where}: field 'base' missing (the run does not say its base)")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise ValueError(f"{where}: field 'base' must be an object with a string 'path', "
                         f"got {base!r:.60}")
    relative = base.get("relative_path")
    if isinstance(relative, str) and relative and (run / relative / marker).is_file():
        return str((run / relative).resolve())
    return base["path"]


def run_identity(config: dict) -> dict:
    """The part of a run's config that decides whether two runs are the same run."""
    return {k: v for k, v in config.items() if k not in ("created", "wall_s")}


def run_work_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """The folder a run trains into: ``out_dir`` itself, or, when ``overwrite`` replaces a
    folder that holds something, a staging folder beside it (``.NAME.new-run``) that
    :func:`publish_run` swaps in once the run is complete. Every process computes the same."""
    out = Path(out_dir)
    if overwrite and out.is_dir() and any(out.iterdir()):
        return out.parent / f".{out.name}.new-run"
    return out


def prepare_run_dir(out_dir: str | Path, config: dict, overwrite: bool = False) -> Path:
    """Create the folder a run trains into (:func:`run_work_dir`), refusing an ``out_dir`` that
    holds something else (module docstring: the rules); returns it. With ``overwrite`` the old
    minituner folder stays whole until :func:`publish_run` replaces it with the finished run."""
    out = Path(out_dir)
    recover_directory(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")
    work = run_work_dir(out, overwrite)
    if work != out:
        check_replaceable(out)
        shutil.rmtree(work, ignore_errors=True)
    elif out.is_dir() and any(out.iterdir()):
        _check_reusable(out, config)
        remove_stale_tmp(out)
    work.mkdir(parents=True, exist_ok=True)
    return work


def publish_run(work_dir: str | Path, out_dir: str | Path) -> None:
    """Put a finished run trained in a staging folder at ``out_dir``: the old folder goes only
    once the new one is complete and fsynced, and a kill leaves one or the other whole."""
    work, out = Path(work_dir), Path(out_dir)
    if work != out:
        fsync_tree(work)
        replace_directory(work, out)


def discard_staging(work_dir: str | Path, out_dir: str | Path) -> None:
    """Remove the staging folder of a run that stopped; the old ``out_dir`` stays as it was."""
    if Path(work_dir) != Path(out_dir):
        shutil.rmtree(work_dir, ignore_errors=True)


def _check_reusable(out: Path, config: dict) -> None:
    """Refuse (without --overwrite) a folder that holds something a new run would destroy."""
    existing = out / CONFIG_FILE
    status = run_status(out)
    if status is None:
        if existing.is_file():  # a config.json minituner cannot read: say why
            check_run_format(read_json(existing), existing)
        check_replaceable(out)  # names what the folder holds
        raise FileExistsError(f"{out}: folder is not empty and holds no run (use --overwrite)")
    old = check_run_format(read_json(existing), existing)
    if run_identity(old) == run_identity(config):
        refuse_unfinished(out)
        return
    if status == "failed":
        remove_directory(out)  # a run that stopped on an error holds nothing to keep
        return
    raise FileExistsError(f"{out}: already holds a different run (pass --overwrite to replace it)")


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
