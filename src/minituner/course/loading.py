"""Loading what a run folder holds for evaluation, generation and merging: a base or merged
Mini-GPT, a full fine-tuning run, or a LoRA / QLoRA run (its base plus its adapter).

An adapter is attached only to the base it was trained on: its recorded base fingerprint must
match the float base or, for a QLoRA adapter, the same base quantized to NF4 (the scheme is
read from the adapter's run folder, default :data:`minituner.quant.DEFAULT_QUANT_SCHEME`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from minituner.course.finetune import load_base
from minituner.lora.adapters import base_fingerprint, load_adapter
from minituner.lora.multi import add_named_adapters
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.qlora import wrap_minigpt_qlora
from minituner.training.config import ADAPTER_METHODS
from minituner.training.runs import MODEL_FILE, load_run_config, recorded_base_path
from minituner.util.files import read_json

ADAPTER_CONFIG = "adapter_config.json"


def _adapter_settings(adapter_dir: Path) -> dict:
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{adapter_dir}: not an adapter folder (no {ADAPTER_CONFIG})")
    config_path = adapter_dir / ADAPTER_CONFIG
    config = read_json(config_path, "adapter config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: adapter config must be a JSON object, "
                         f"got {type(config).__name__}")
    section = config.get("minituner") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{config_path}: field 'minituner' must be an object, "
                         f"got {type(section).__name__}")
    run_config = adapter_dir.parent / "config.json"
    scheme = DEFAULT_QUANT_SCHEME
    if run_config.is_file():
        scheme = (read_json(run_config).get("finetune") or {}).get("quant_scheme", scheme)
    return {
        "r": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
        "use_dora": config.get("use_dora") is True,
        "targets": section.get("target_modules_requested") or config.get("target_modules"),
        "fingerprint": (section.get("base_fingerprint") or {}).get("value"),
        "quant_scheme": scheme,
    }


def attach_adapter(model, adapter_dir, verify_base: bool = True) -> tuple:
    """(model with the adapter, "lora" | "qlora"); refuses an adapter from another base
    (``verify_base=False``: attaches it as float LoRA with a warning)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: adapter folder not found")
    settings = _adapter_settings(adapter_dir)
    saved = settings["fingerprint"]
    if saved is None or saved == base_fingerprint(model):
        return load_adapter(model, adapter_dir, strict=verify_base), "lora"
    targets = settings["targets"]
    extra = {"target_modules": targets} if isinstance(targets, (list, str)) else {}
    quantized = wrap_minigpt_qlora(copy.deepcopy(model), r=int(settings["r"]),
                                   alpha=float(settings["alpha"]),
                                   quant_scheme=settings["quant_scheme"],
                                   use_dora=settings["use_dora"], **extra)
    if base_fingerprint(quantized) != saved:
        if not verify_base:
            return load_adapter(model, adapter_dir, strict=False), "lora"
        raise ValueError(
            f"{adapter_dir}: adapter was trained on another base (fingerprint "
            f"{str(saved)[:12]}... matches neither this model nor its NF4 version; pass "
            "--no-verify-base to attach it anyway)"
        )
    return load_adapter(quantized, adapter_dir), "qlora"


def attach_named_adapters(model, adapters: dict, verify_base: bool = True) -> tuple:
    """(model holding every adapter of ``adapters`` (name -> folder) under its name, the first
    active; "lora" | "qlora" as the first one decides). Each other adapter must fit the base
    the first one chose (float or NF4), or a one-line error names it."""
    (first, directory), *others = adapters.items()
    try:
        model, kind = attach_adapter(model, directory, verify_base)
    except ValueError as exc:
        raise ValueError(f"adapter {first!r}: {exc}") from None
    add_named_adapters(model, first, dict(others), strict=verify_base)
    return model, kind


def recorded_base(config: dict, run: Path) -> str:
    """The base folder a fine-tuning run's config.json records (seen from the run folder when
    both were moved together), or a one-line error naming the field."""
    return recorded_base_path(config, run, MODEL_FILE)


def load_run(run_dir, adapter=None, verify_base: bool = True) -> tuple:
    """(model, tokenizer, description) for a model run, a full-FT run or a LoRA/QLoRA run
    (``verify_base=False``: an adapter from another base is attached with a warning);
    ``adapter`` may be a dict of name -> folder: several named adapters on the run's base."""
    run = Path(run_dir)
    config = load_run_config(run)
    if config.get("kind") == "finetune" and config.get("method") in ADAPTER_METHODS:
        base = Path(recorded_base(config, run))
        model, tokenizer, _ = load_base(base)
        adapter = adapter or run / "adapter"
        description = {"base": str(base)}
    else:
        model, tokenizer, _ = load_base(run)
        description = {"base": str(run)}
    if isinstance(adapter, dict):
        model, kind = attach_named_adapters(model, adapter, verify_base)
        description.update(adapters={n: str(d) for n, d in adapter.items()}, adapter_kind=kind)
    elif adapter is not None:
        model, kind = attach_adapter(model, adapter, verify_base)
        description.update(adapter=str(adapter), adapter_kind=kind)
    return model, tokenizer, description
