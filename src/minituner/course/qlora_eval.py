"""What a QLoRA run adds to its results: the same adapter on a full-precision base (logit
difference) and the memory table, full-precision-base LoRA vs NF4-base QLoRA, predicted by
:mod:`minituner.training.memory` and measured by tensor accounting
(:mod:`minituner.training.accounting`).
"""

from __future__ import annotations

import torch

from minituner.course.data import text_sequence
from minituner.course.evaluate import evaluate_model, load_builtin_probes
from minituner.course.objectives import make_loss_fn
from minituner.lora import (
    disable_adapters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    wrap_minigpt_with_lora,
)
from minituner.lora.init import converted_pair
from minituner.quant.qlora import QuantizedLinear, logit_difference
from minituner.training.accounting import training_state_bytes
from minituner.training.config import uses_dora
from minituner.training.loop import build_optimizer
from minituner.training.memory import plan_memory
from minituner.training.runs import load_base_run
from minituner.training.sampling import collate

MEMORY_NOTE = (
    "fp32 compute everywhere; measured = exact tensor bytes on the same micro-batch (plain "
    "next-token loss, no KL reference) after one AdamW step; predicted = minituner.training.memory."
    "plan_memory with the same rank, batch, sequence length and fp32 dtypes. Measured "
    "activations are the tensors autograd saved; the planner also counts the logits' "
    "transient gradients, so the two activation columns are not the same quantity; QLoRA's "
    "measured activations include its shared dequantization scratch (as the planner does)."
)


def _logit_probe(tokenizer, texts: list):
    """A callable giving the logits at every real (non-padding) position of ``texts``."""
    batch = collate([text_sequence(tokenizer, t) for t in texts], tokenizer.pad_id)

    def probe(model):
        return model(batch["input_ids"])[batch["target_mask"]]

    return probe


def _measured(model, loss_fn, batch: dict, lr: float) -> dict:
    """Tensor bytes after one throwaway AdamW step on a copy's optimizer state."""
    optimizer = build_optimizer(model, lr=lr)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_sum, count = loss_fn(model, batch)
    (loss_sum / max(1, int(count))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])
    return training_state_bytes(model, optimizer, loss_fn, batch)


def _row(label: str, method: str, predicted, measured: dict) -> dict:
    weights = measured["parameters_trainable_bytes"] + measured["frozen_weight_bytes"]
    return {
        "setup": label, "method": method,
        "predicted": dict(predicted.buckets) | {"total": predicted.total_bytes},
        "measured": {"weights": weights, "gradients": measured["gradient_bytes"],
                     "optimizer": measured["optimizer_state_bytes"],
                     "activations": (measured["saved_activation_bytes"]
                                     + measured["dequant_scratch_bytes"]),
                     "total": measured["total_bytes"]},
        "frozen_base_bytes_measured": measured["frozen_weight_bytes"],
    }


@torch.no_grad()
def _weight_error(float_model, qlora_model) -> dict:
    """||W - dequant(NF4(W))|| / ||W|| over the quantized Linears: mean, min and max."""
    floats = dict(lora_layers(float_model))
    errors = []
    for name, layer in lora_layers(qlora_model):
        if isinstance(layer.base, QuantizedLinear) and name in floats:
            weight = floats[name].base.weight.float()
            error = weight - layer.base.dequantized_weight(torch.float32)
            errors.append(float(error.norm() / weight.norm()))
    if not errors:
        return {}
    return {"mean": sum(errors) / len(errors), "min": min(errors), "max": max(errors),
            "n_layers": len(errors)}


def _converted_state(trained: dict, initial: dict) -> dict:
    """lora_state_dict of the rank-2r adapter [B_t, -B_0] [A_t; A_0] for the original base."""
    state = {}
    for key in trained:
        if key.endswith(".lora_A"):
            path = key[: -len(".lora_A")]
            state[key], state[path + ".lora_B"] = converted_pair(
                trained[key], trained[path + ".lora_B"], initial[key], initial[path + ".lora_B"])
    return state


def qlora_comparison(base_dir, qlora_model, cfg, prepared, loss_fn, batches, tokenizer,
                     initial: dict | None = None) -> dict:
    """Logit difference of the trained adapter on NF4 vs fp32 bases, and the memory table.

    ``initial`` (a LoftQ start's adapter at step 0): the fp32 twin then gets the converted
    rank-2r adapter (trained minus initial), as it is saved for the original base.
    """
    twin, _, _ = load_base_run(base_dir)
    targets = {} if cfg.targets is None else {"target_modules": list(cfg.targets)}
    trained = lora_state_dict(qlora_model)
    if initial is None:
        wrap_minigpt_with_lora(twin, r=cfg.rank, alpha=cfg.alpha, seed=cfg.seed,
                               use_dora=uses_dora(cfg.method), **targets)
    else:
        wrap_minigpt_with_lora(twin, r=2 * cfg.rank, alpha=2 * cfg.alpha, seed=cfg.seed,
                               **targets)
        trained = _converted_state(trained, initial)
    load_lora_state_dict(twin, trained)
    probe = _logit_probe(tokenizer, prepared.control_texts)
    difference = logit_difference(qlora_model, twin, probe).to_dict()
    probes = load_builtin_probes()
    twin_eval = evaluate_model(twin, tokenizer, probes, prepared.control_texts)
    with disable_adapters(qlora_model):
        nf4_base = evaluate_model(qlora_model, tokenizer, probes, prepared.control_texts)
    weight_error = _weight_error(twin, qlora_model)
    plain_loss = make_loss_fn(None, 0.0)
    batch = batches(0)
    shape = {"rank": cfg.rank, "batch": int(batch["input_ids"].shape[0]),
             "seq": int(batch["input_ids"].shape[1]), "base_dtype": "fp32",
             "adapter_dtype": "fp32", "compute_dtype": "fp32"}
    rows = [
        _row("full-precision base + LoRA", "lora", plan_memory("minigpt", "lora", **shape),
             _measured(twin, plain_loss, batch, cfg.lr)),
        _row("NF4 base + LoRA (QLoRA)", "qlora",
             plan_memory("minigpt", "qlora", **shape, quant="nf4-dq"),
             _measured(qlora_model, plain_loss, batch, cfg.lr)),
    ]
    return {
        "logit_difference": difference,
        "logit_difference_note": ("the QLoRA-trained adapter on the NF4 base (model A) vs the same "
                                  "adapter on the fp32 base (model B), logits at every position "
                                  "of the control lines; relative = mean |A-B| / mean |B|"),
        "same_adapter_on_fp32_base": {
            "irregular_accuracy": twin_eval["irregular_accuracy"],
            "regular_accuracy": twin_eval["regular_accuracy"],
            "control_ppl": twin_eval["control_ppl"],
        },
        "nf4_base_without_adapter": {
            "irregular_accuracy": nf4_base["irregular_accuracy"],
            "regular_accuracy": nf4_base["regular_accuracy"],
            "control_ppl": nf4_base["control_ppl"],
        },
        "nf4_weight_relative_error": weight_error,
        "memory_table": rows, "memory_shape": shape, "memory_note": MEMORY_NOTE,
    }
