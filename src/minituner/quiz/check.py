"""Checks that recompute the quiz's answers from minituner's own code and results.

Each function named in the quiz YAML's ``check`` field takes the path of the results file (only
the results questions read it) and returns either the set of true option numbers (single/multi
questions; compared with ``answer``) or a dict of named values (free questions; compared with
``expected``). The answers are derived from observations (parameter counts, outputs, bit
counts, committed measurements), never copied from the YAML, so a quiz that drifts from the
library fails ``minituner quiz check``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from minituner.lora import (
    LoRALinear,
    count_lora_params,
    is_lora_name,
    lora_layers,
    lora_ratio,
    merge_lora,
    unmerge_lora,
    wrap_minigpt_with_lora,
)
from minituner.models.minigpt import MiniGPT, MiniGPTConfig
from minituner.quant.qlora import wrap_minigpt_qlora
from minituner.quiz.check_memory import MEMORY_CHECKS, CheckError
from minituner.quiz.results import forgetting_options, read_results, sweep_options
from minituner.training.loop import build_optimizer

CHECKS: dict = {}

# Option order of the choice questions; tests compare these with the YAML's option text.
Q01_COEFFICIENTS = (128, 640, 1024, 2304)


def check(fn: Callable) -> Callable:
    """Register ``fn`` under its name so the quiz YAML can refer to it."""
    CHECKS[fn.__name__] = fn
    return fn


def _mini_gpt(seed: int = 0):
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        return MiniGPT(MiniGPTConfig()).eval()


def _wrap(model, r: int, alpha: float):
    wrapped = wrap_minigpt_with_lora(model, r=r, alpha=alpha, seed=0)
    return wrapped if wrapped is not None else model


def _lora_modules(model) -> list:
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def _trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tokens(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 32), generator=generator)


@check
def lora_params_per_rank(results: Path) -> set:
    """q-28-01: count the trainable parameters of all-Linear LoRA at several r."""
    measured = {}
    for r in (1, 2, 4, 8, 16):
        model = _wrap(_mini_gpt(), r=r, alpha=2 * r)
        trainable = _trainable_count(model)
        if count_lora_params(model) != trainable:
            raise CheckError(f"r={r}: count_lora_params disagrees with requires_grad count")
        measured[r] = trainable
    return {
        number
        for number, coefficient in enumerate(Q01_COEFFICIENTS, 1)
        if all(coefficient * r == count for r, count in measured.items())
    }


@check
def zero_b_keeps_base_output(results: Path) -> set:
    """q-28-02: B = 0 keeps step-0 outputs equal to the base; a random B moves them."""
    base = _mini_gpt()
    tokens = _tokens()
    with torch.no_grad():
        base_logits = base(tokens)
        zero_b = _wrap(copy.deepcopy(base), r=8, alpha=16)
        zero_b_equal = torch.equal(zero_b(tokens), base_logits)
        random_b = _wrap(copy.deepcopy(base), r=8, alpha=16)
        _randomize_b(random_b, seed=2)
        random_moved = (random_b(tokens) - base_logits).abs().max().item() > 1e-4
        rank_ok = all(
            torch.linalg.matrix_rank(module.lora_B @ module.lora_A).item() <= module.r
            for module in _lora_modules(random_b)
        )
    try:
        losses = _adamw_steps(random_b, tokens, steps=5)
    except (ValueError, TypeError, RuntimeError):
        losses = None  # AdamW refused the random start
    stable = losses is not None and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    true_options = set()
    if losses is not None and not stable:
        true_options.add(1)
    if zero_b_equal and random_moved:
        true_options.add(2)
    if not rank_ok:
        true_options.add(3)
    if losses is None:
        true_options.add(4)
    return true_options


def _adamw_steps(model, tokens, steps: int) -> list:
    """Train the trainable parameters for a few AdamW steps; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        _, loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@check
def rank_zero_trains_nothing(results: Path) -> set:
    """q-28-03: wrap at r = 0 and observe parameters, B @ A and the optimizers."""
    model = _wrap(_mini_gpt(), r=0, alpha=16)
    modules = _lora_modules(model)
    if len(modules) != 12:
        raise CheckError(f"expected 12 LoRA modules at r=0, found {len(modules)}")
    zero_trainable = _trainable_count(model) == 0
    base_trainable = any(
        param.requires_grad for name, param in model.named_parameters() if not is_lora_name(name)
    )
    try:
        build_optimizer(model, lr=1e-3)
        optimizer_built = True
    except ValueError:
        optimizer_built = False
    products_zero = True
    for module in modules:
        product = module.lora_B @ module.lora_A
        out_features, in_features = module.base.weight.shape
        shape_ok = tuple(product.shape) == (out_features, in_features)
        products_zero = products_zero and shape_ok and not product.any().item()
    try:
        torch.optim.AdamW([], lr=1e-3)
        empty_adamw_raises = False
    except ValueError:
        empty_adamw_raises = True
    true_options = set()
    if zero_trainable:
        true_options.add(1)
    if base_trainable or optimizer_built:
        true_options.add(2)
    if products_zero:
        true_options.add(3)
    if empty_adamw_raises:
        true_options.add(4)
    return true_options


@check
def lora_ratio_by_width(results: Path) -> dict:
    """q-28-04: 2r/h at r = 8 for h = 64, 768, 4096, and a measured h = 64 layer."""
    ratios = {h: lora_ratio(h, 8) for h in (64, 768, 4096)}
    layer = LoRALinear(nn.Linear(64, 64, bias=False), r=8, alpha=16)
    measured = _trainable_count(layer) / (64 * 64)
    return {
        "ratio_h64": ratios[64],
        "ratio_h768": ratios[768],
        "ratio_h4096": ratios[4096],
        "measured_ratio_h64": measured,
        "shrinks_as_h_grows": ratios[64] > ratios[768] > ratios[4096],
    }


def _randomize_b(model, seed: int, std: float = 0.02) -> None:
    """Give every B a random value, as after some training (B = 0 only at step 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _lora_modules(model):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * std)


def _requantized_merge_drift() -> float:
    """Largest logit change when a QLoRA Mini-GPT merges its adapters back into NF4."""
    model = wrap_minigpt_qlora(_mini_gpt(), r=8, alpha=16, seed=0)
    _randomize_b(model, seed=3)
    return merge_lora(model, probe=_tokens(), target="requantized").max_abs_diff


@check
def merge_exactness(results: Path) -> set:
    """q-28-10: merge into full-precision and NF4 bases, compare outputs, rank and unmerge."""
    model = _wrap(_mini_gpt(), r=8, alpha=16)
    _randomize_b(model, seed=3)
    layers = lora_layers(model)
    original = {name: layer.base.weight.detach().clone() for name, layer in layers}
    with torch.no_grad():
        update_rank_ok = all(
            torch.linalg.matrix_rank(layer.delta_weight()).item() <= layer.r for _, layer in layers
        )
        fp_error = merge_lora(model, probe=_tokens()).max_abs_diff
        unmerge_lora(model)
        unmerge_error = max(
            (layer.base.weight - original[name]).abs().max().item() for name, layer in layers
        )
    nf4_error = _requantized_merge_drift()
    true_options = set()
    if fp_error <= 1e-5:
        true_options.add(1)
    if nf4_error <= 1e-5:
        true_options.add(2)
    if update_rank_ok:
        true_options.add(3)
    if unmerge_error > 1e-5:
        true_options.add(4)
    return true_options


@check
def forgetting_from_results(results: Path) -> set:
    """q-28-11: classify the committed control-perplexity changes of LoRA r=8 and full FT."""
    return forgetting_options(read_results(results))


@check
def rslora_scaling(results: Path) -> set:
    """q-28-12: how alpha/r and alpha/sqrt(r) change from r = 8 to r = 32 at fixed alpha."""

    def scale(r: int, rslora: bool) -> float:
        return LoRALinear(nn.Linear(64, 64), r=r, alpha=16, use_rslora=rslora).scaling

    plain = scale(8, False) / scale(32, False)
    stable = scale(8, True) / scale(32, True)
    true_options = set()
    if math.isclose(plain, 4.0) and math.isclose(stable, 2.0):
        true_options.add(1)
    if math.isclose(plain, 4.0) and math.isclose(stable, 4.0):
        true_options.add(2)
    if math.isclose(stable, 1.0):
        true_options.add(3)
    if math.isclose(stable, 0.5):
        true_options.add(4)
    return true_options


@check
def rank_sweep_from_results(results: Path) -> set:
    """q-28-13: classify the committed rank sweep's accuracy curve."""
    return sweep_options(read_results(results))


for _memory_check in MEMORY_CHECKS:  # q-28-05 to q-28-09, in minituner.quiz.check_memory
    check(_memory_check)
