"""Merging an adapter into a transformers base and writing a standard transformers directory.

The adapter's ``minituner.base`` record says how its base was loaded (float LoRA or NF4
QLoRA, compute dtype, quant scheme); an adapter saved by PEFT has none and is taken as float
LoRA. The same base is loaded again (the fingerprint check refuses another one), the adapter is
merged, and the result is written with :func:`minituner.hf.save.save_hf_model`:

- ``dequantized`` (default): float weights. From an NF4 base, each adapted layer becomes
  dequantized(W) + scaling * B @ A, and every other NF4 layer is dequantized too, so the
  directory is a plain float model. GPT-2's layers are written back as Conv1D (in, out).
- ``requantized``: every all-linear layer is NF4 (W + update quantized again with fresh
  scales), written in bitsandbytes' 4-bit layout; this moves outputs and the report says how
  far.

``merge_report.json`` (in the output directory) gives the largest and mean absolute logit
difference between the unmerged adapter model and (a) the merged model in memory, (b) the
directory loaded back with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from minituner.hf.load import (
    base_record,
    load_base,
    load_quantized_hf_model,
    quantize_loaded_model,
    recorded_base_dir,
)
from minituner.hf.models import context_length, hf_dir, load_hf_model
from minituner.hf.save import save_hf_model
from minituner.hf.tokens import adapter_tokenizer, attach_adapter
from minituner.lora import (
    lora_layers,
    merge_and_unload,
    output_drift,
    run_probe,
    set_submodule,
    source_fan_in_fan_out,
)
from minituner.lora.adapters import CONFIG_NAME
from minituner.lora.merge import check_finite
from minituner.quant import DEFAULT_QUANT_SCHEME
from minituner.quant.qlora import MERGE_TARGETS, QuantizedLinear, parse_quant_scheme
from minituner.training.runs import check_replaceable
from minituner.util.files import atomic_directory, atomic_write_json, check_out_apart, read_json


def recorded_hf_base(adapter_dir: str | os.PathLike) -> dict | None:
    """The transformers base an adapter records (``minituner.base``), or None."""
    config = read_json(Path(adapter_dir) / CONFIG_NAME, "adapter config")
    section = config.get("minituner") if isinstance(config, dict) else None
    record = section.get("base") if isinstance(section, dict) else None
    return record if isinstance(record, dict) and record.get("kind") == "transformers" else None


def adapter_base_record(adapter_dir: str | os.PathLike, model_spec: str | None) -> dict:
    """The adapter's record of its base (PEFT adapters: float LoRA in fp32 on ``model_spec``)."""
    record = recorded_hf_base(adapter_dir)
    if record is not None:
        return {**record, "path": recorded_base_dir(record, adapter_dir)}
    if model_spec is None:
        raise ValueError(f"{adapter_dir}: the adapter does not record its base; pass --model")
    return base_record(model_spec, "lora", torch.float32)


def probe_tokens(vocab_size: int, context: int | None, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids (4 x up to 32) for the merge report."""
    length = min(32, context or 32)
    return torch.randint(0, vocab_size, (4, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return run_probe(model, lambda m: m(input_ids=tokens.to(device), use_cache=False).logits).cpu()


def _drift(reference: torch.Tensor, other: torch.Tensor) -> dict:
    max_diff, mean_diff = output_drift(reference, other)
    scale = float(reference.abs().mean())
    return {"max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
            "relative_mean_diff": mean_diff / scale if scale else None}


@torch.no_grad()
def _as_float_layer(layer: nn.Module, dtype: torch.dtype, fan_in_fan_out: bool) -> nn.Module:
    """A float Linear (or Conv1D for a layer GPT-2 stored (in, out)) holding a merged or NF4
    layer's weight."""
    if isinstance(layer, QuantizedLinear):
        weight, bias = layer.dequantized_weight(torch.float32), layer.bias
    else:
        weight, bias = layer.weight, layer.bias
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        out = Conv1D(weight.shape[0], weight.shape[1])  # nf = out, nx = in; weight (in, out)
        out.weight.copy_(weight.t())
        if bias is None:
            out.bias = None
        else:
            out.bias.copy_(bias)
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.to(device=weight.device, dtype=dtype).requires_grad_(False)


def _merge(model: nn.Module, target: str, record: dict) -> nn.Module:
    """Merge every adapter into its base and unload; layout per ``target``."""
    dtype = getattr(torch, record.get("compute_dtype", "float32"))
    blocksize, double_quant = parse_quant_scheme(record.get("quant_scheme", DEFAULT_QUANT_SCHEME))
    # the layout each adapted layer was stored in, read before merging replaces NF4 bases
    sources = {name: source_fan_in_fan_out(layer.base) for name, layer in lora_layers(model)}
    quantized_base = record.get("method") == "qlora"
    merge_and_unload(model, target=target if quantized_base else None)  # NF4 bases: per target
    if target == "dequantized":
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                set_submodule(model, name, _as_float_layer(module, dtype,
                                                           module.source_fan_in_fan_out))
            elif quantized_base and name in sources:
                set_submodule(model, name, _as_float_layer(module, dtype, sources[name]))
        return model
    if not quantized_base:
        return quantize_loaded_model(model, dtype, blocksize, double_quant)
    return model  # every all-linear layer is NF4 already (the adapted ones freshly requantized)


def merge_hf_adapter(model_spec: str | None, adapter_dir, out_dir, target: str | None = None,
                     device: str | torch.device = "cpu", overwrite: bool = False,
                     strict: bool = True, allow_pickle: bool = False) -> dict:
    """Merge ``adapter_dir`` into its base and write ``out_dir``; returns the merge report.

    ``out_dir`` may not overlap the base or the adapter; ``overwrite`` replaces only a folder
    minituner wrote, and atomically: the directory and its report are built next to it and
    swapped in (a kill leaves the old output or the new one).
    """
    target = target or "dequantized"
    if target not in MERGE_TARGETS:
        raise ValueError(f"--target must be one of {list(MERGE_TARGETS)}, got {target!r}")
    record = adapter_base_record(adapter_dir, model_spec)
    path = model_spec if model_spec is not None else record["path"]
    out = Path(out_dir)
    check_out_apart(out, {"--model": hf_dir(path), "--adapter": adapter_dir})
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder is not empty (pass --overwrite to replace it)")
        check_replaceable(out)
    base = load_base(record, device=device, path=path, allow_pickle=allow_pickle)
    model = attach_adapter(base, adapter_dir, record, strict=strict)
    tokens = probe_tokens(model.config.vocab_size, context_length(model.config))
    before = _logits(model, tokens)
    n_layers = len(lora_layers(model))
    merged = _merge(model, target, record)
    in_memory = _drift(before, _logits(merged, tokens))
    check_finite(merged.state_dict().items(), f"merge of {adapter_dir}")
    tokenizer = adapter_tokenizer(adapter_dir, record, path)
    with atomic_directory(out) as staging:
        save_hf_model(merged, staging, tokenizer=tokenizer)
        reloaded = _drift(before, _logits(_reload(staging, target, device), tokens))
        report = _report(target, n_layers, record, adapter_dir, out, tokens, in_memory, reloaded)
        atomic_write_json(staging / "merge_report.json", report)
    return report


def _report(target: str, n_layers: int, record: dict, adapter_dir, out: Path,
            tokens: torch.Tensor, in_memory: dict, reloaded: dict) -> dict:
    report = {
        "target": target, "n_layers": n_layers, "base": record, "adapter": str(adapter_dir),
        "output": str(out), "probe": {"shape": list(tokens.shape), "seed": 0},
        "merged_in_memory": in_memory, "reloaded_from_directory": reloaded,
        "note": ("logit differences against the unmerged adapter model on seeded random "
                 "tokens; 'dequantized' should be float rounding, 'requantized' re-rounds "
                 "every weight to NF4"),
    }
    return report


def _reload(out: Path, target: str, device) -> nn.Module:
    """The written directory loaded back (transformers for float, minituner's reader for NF4)."""
    if target == "dequantized":
        return load_hf_model(out, device=device)
    return load_quantized_hf_model(out, device=device)
