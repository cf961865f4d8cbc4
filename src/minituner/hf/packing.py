"""Sample packing for transformers models: which attention keeps packed examples apart, and
the model inputs of a packed batch.

Every architecture minituner loads (gpt2, llama, mistral, qwen2, qwen3) gets the same thing:
a 4D additive block-diagonal causal mask (:func:`minituner.training.packing.block_causal_mask`,
in the model's compute dtype) and per-example ``position_ids``. transformers 5 hands a 4D mask
to the attention unchanged (``create_causal_mask`` returns it as is), and both the ``eager``
path (adds it to the scores) and the ``sdpa`` path (passes it to
``scaled_dot_product_attention``) apply it. GPT-2 reads the position ids for its learned
position embedding, the RoPE models for their rotations. No variable-length (flash) kernel is
used: those need CUDA. tests/hf/test_packing.py checks that a packed batch gives each example
its own loss and gradients.

A model whose attention would not honour that mask is refused by name: another attention
implementation (flash or flex attention ignore or replace a 4D additive mask), or a sliding
window shorter than the packed row (the 4D mask would replace the window, so a long example
would see more than it sees alone).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minituner.training.packing import block_causal_mask

__all__ = ["PACKING_ATTENTION", "check_packing_config", "check_packing_model", "packed_inputs"]

PACKING_ATTENTION = ("eager", "sdpa")  # attention implementations that apply a 4D mask


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if getattr(config, "use_sliding_window", True) is False:  # qwen2/qwen3 switch it off
        return None
    return window


def check_packing_config(config, row_tokens: int) -> None:
    """Refuse --packing for a model whose attention cannot keep examples apart, by name."""
    model_type = getattr(config, "model_type", "?")
    attention = getattr(config, "_attn_implementation", None)
    if attention is not None and attention not in PACKING_ATTENTION:
        raise ValueError(f"--packing: model type {model_type!r} uses attention {attention!r}, "
                         "which does not apply a 4D block-diagonal mask, so packed examples "
                         f"would see each other (packing needs {' or '.join(PACKING_ATTENTION)})")
    window = _sliding_window(config)
    if window is not None and window < row_tokens:
        raise ValueError(f"--packing: model type {model_type!r} has a sliding attention window "
                         f"of {window} tokens, shorter than the packed row of {row_tokens}; the "
                         "packed mask would replace the window (use --max-len "
                         f"{window} or leave out --packing)")


def check_packing_model(model: nn.Module, row_tokens: int) -> None:
    """:func:`check_packing_config` on a loaded model (its resolved attention implementation)."""
    check_packing_config(model.config, row_tokens)


def packed_inputs(batch: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """attention_mask (4D, additive, ``dtype``) and position_ids of a packed batch."""
    segments = batch["segment_ids"].to(device)
    return {"attention_mask": block_causal_mask(segments, dtype),
            "position_ids": batch["position_ids"].to(device)}
