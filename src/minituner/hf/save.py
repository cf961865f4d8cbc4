"""Writing transformers model directories: float models, and NF4 models in bitsandbytes' layout.

A float model is written as ``save_pretrained`` would (config.json, model.safetensors,
generation_config.json when there is one, and the tokenizer). A model with
:class:`minituner.quant.qlora.QuantizedLinear` layers is written as a bitsandbytes 4-bit checkpoint:
each quantized layer's tensors use ``bnb.nn.Linear4bit``'s state-dict keys and config.json
carries the ``quantization_config`` transformers writes for
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, so
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with bitsandbytes (and
:func:`minituner.hf.load.load_quantized_hf_model` reads it back byte for byte).

The directory is built in a staging folder next to it and renamed into place, so a reader never
sees half of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from minituner.lora import lora_layers
from minituner.lora.targets import is_linear_like
from minituner.quant.qlora import QuantizedLinear
from minituner.util.files import atomic_directory, atomic_save_safetensors, atomic_write_json


def bnb_quantization_config(model: nn.Module) -> dict | None:
    """The bitsandbytes ``quantization_config`` for a model holding QuantizedLinear layers."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    double = {m.double_quant for _, m in layers}
    compute = {m.compute_dtype for _, m in layers}
    if len(double) != 1 or len(compute) != 1:
        raise ValueError("quantized layers disagree on double quantization or compute dtype; "
                         "bitsandbytes' config holds one setting per model")
    quantized = {n for n, _ in layers}
    skipped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if is_linear_like(m) and n not in quantized} | {"lm_head"})
    compute_dtype = compute.pop()
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double.pop(),
        "bnb_4bit_compute_dtype": str(compute_dtype or torch.float32).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skipped,
        "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def export_state_dict(model: nn.Module) -> dict:
    """The model's tensors as a checkpoint holds them: tied parameters once, CPU, contiguous.

    QuantizedLinear layers contribute bitsandbytes ``Linear4bit`` entries.
    """
    first_name: dict = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied.add(name)  # lm_head tied to the embedding: stored under the first name only
        else:
            first_name[id(param)] = name
    out, storages = {}, set()
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()  # e.g. the NF4 code table every layer shares
        storages.add(storage)
        out[key] = tensor
    return out


def embeddings_tied(model: nn.Module) -> bool:
    """True when the output head uses the input embedding's weight (or there is no head)."""
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def save_hf_model(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                  overwrite: bool = False) -> Path:
    """Write ``model`` (float, or with NF4 layers) as a transformers directory, atomically."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty (pass --overwrite to replace it)")
    if lora_layers(model):
        raise ValueError("model still has LoRA layers; merge_and_unload it before saving")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if config.get("tie_word_embeddings") and not embeddings_tied(model):
        config["tie_word_embeddings"] = False  # a head trained apart: transformers must not re-tie
    quantization = bnb_quantization_config(model)
    if quantization is not None:
        config["quantization_config"] = quantization
    with atomic_directory(out) as staging:
        atomic_write_json(staging / "config.json", config)
        atomic_save_safetensors(staging / "model.safetensors", export_state_dict(model),
                                metadata={"format": "pt"})
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            atomic_write_json(staging / "generation_config.json", generation.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return out
