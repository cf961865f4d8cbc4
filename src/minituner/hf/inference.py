"""A transformers model ready for evaluation and sampling: a base (``hf:DIR``), a base plus an
adapter, or a transformers fine-tuning run folder (its recorded base plus its ``adapter/``).

An adapter is loaded onto the base it records (``minituner.base`` in adapter_config.json: float
LoRA or NF4 QLoRA, compute dtype), and its base fingerprint must match; a PEFT adapter without
that record is taken as float LoRA on the given base. Returned models are in eval mode, behind
the Mini-GPT-shaped views of :mod:`minituner.hf.views`. Several adapters (name -> folder) load
as named adapters of :mod:`minituner.lora.multi` on the base the first one records.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.load import load_base
from minituner.hf.merge import adapter_base_record
from minituner.hf.models import load_hf_model, load_hf_tokenizer
from minituner.hf.tokens import adapter_tokenizer, attach_adapter
from minituner.hf.views import hf_views
from minituner.lora.adapters import CONFIG_NAME
from minituner.lora.multi import add_named_adapters

RUN_ADAPTER = "adapter"


def run_adapter_dir(run_dir: str | os.PathLike) -> Path:
    """The adapter folder of a transformers run, or a ValueError naming the missing file."""
    adapter = Path(run_dir) / RUN_ADAPTER
    if not (adapter / CONFIG_NAME).is_file():
        raise ValueError(f"{adapter / CONFIG_NAME}: not found (the run has not saved its "
                         "adapter yet)")
    return adapter


def load_adapted_model(model_spec: str | None, adapter_dir: str | os.PathLike,
                       device: str | torch.device = "cpu", allow_pickle: bool = False,
                       verify_base: bool = True) -> tuple:
    """(model with the adapter applied, its base directory); ``model_spec`` None: the base
    the adapter records. ``verify_base=False``: a fingerprint mismatch only warns."""
    record = adapter_base_record(adapter_dir, model_spec)
    path = model_spec if model_spec is not None else record["path"]
    base = load_base(record, device=device, path=path, allow_pickle=allow_pickle)
    model = attach_adapter(base, adapter_dir, record, strict=verify_base)
    return model, path


def load_named_adapters(model_spec: str | None, adapters: dict,
                        device: str | torch.device = "cpu", allow_pickle: bool = False,
                        verify_base: bool = True) -> tuple:
    """(model holding every adapter of ``adapters`` (name -> folder) under its name, the first
    one active; its base directory). The base is the one the first adapter records (or
    ``model_spec``); every other adapter must fit it (fingerprint, shapes), or a one-line
    error names it."""
    (first, directory), *others = adapters.items()
    try:
        model, path = load_adapted_model(model_spec, directory, device, allow_pickle,
                                         verify_base)
    except ValueError as exc:
        raise ValueError(f"adapter {first!r}: {exc}") from None
    add_named_adapters(model, first, dict(others), strict=verify_base)
    return model, path


def inference_views(model_spec: str | None, adapter_dir: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", allow_pickle: bool = False,
                    verify_base: bool = True) -> tuple:
    """(ModelView, TokenizerView) of a transformers base, with ``adapter_dir`` applied when
    given (``model_spec`` None: the adapter's recorded base); a dict of name -> folder loads
    them all as named adapters (:func:`load_named_adapters`)."""
    if isinstance(adapter_dir, dict):
        model, path = load_named_adapters(model_spec, adapter_dir, device, allow_pickle,
                                          verify_base)
    elif adapter_dir is not None:  # new tokens (--add-tokens): the tokenizer beside it
        model, path = load_adapted_model(model_spec, adapter_dir, device, allow_pickle,
                                         verify_base)
        record = adapter_base_record(adapter_dir, model_spec)
        return hf_views(model.eval(), adapter_tokenizer(adapter_dir, record, path))
    elif model_spec is None:
        raise ValueError("--model: give a transformers model (hf:DIR) or an adapter")
    else:
        model = load_hf_model(model_spec, device=device, allow_pickle=allow_pickle)
        path = model_spec
    return _views(model, path)


def run_inference_views(run_dir: str | os.PathLike, adapter_dir=None,
                        device: str | torch.device = "cpu", allow_pickle: bool = False,
                        verify_base: bool = True) -> tuple:
    """(ModelView, TokenizerView) of a transformers run folder: its base plus its adapter (or
    ``adapter_dir`` instead: a folder, or a dict of name -> folder)."""
    if isinstance(adapter_dir, dict):
        return inference_views(None, adapter_dir, device, allow_pickle, verify_base)
    adapter = Path(adapter_dir) if adapter_dir is not None else run_adapter_dir(run_dir)
    return inference_views(None, adapter, device, allow_pickle, verify_base)


def _views(model: nn.Module, path) -> tuple:
    return hf_views(model.eval(), load_hf_tokenizer(path))
